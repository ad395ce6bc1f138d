"""Runs triton_interpret_cases.py in a subprocess with TRITON_INTERPRET=1 (CPU), and natively on a
GPU. A subprocess keeps TRITON_INTERPRET out of this process, where it would slow every other Triton
user down."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="triton is not installed")


def _run_cases(extra_env, timeout):
    env = dict(os.environ, **extra_env)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
         "ignore::DeprecationWarning", str(HERE / "triton_interpret_cases.py")],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=str(HERE))
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]


@requires_triton
def test_triton_kernel_interpret_mode():
    _run_cases({"TRITON_INTERPRET": "1", "SOFT_MASK_TEST_DEVICE": "cpu"}, timeout=600)


@pytest.mark.gpu
@requires_triton
def test_triton_kernel_on_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _run_cases({"TRITON_INTERPRET": "0", "SOFT_MASK_TEST_DEVICE": "cuda"}, timeout=1200)
