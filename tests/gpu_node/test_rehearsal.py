"""Issue 31 item 4: what the rehearsal accepts of the check's report (every part ran, or skipped for
lack of a GPU only, the bundle used, the node's versions), its work directory, and the entry points'
bad input as one line. The rehearsal itself (a venv of the node's versions, several GiB) runs by
`make gpu-rehearsal`; docs/GPU.md records its last run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_conan.cli import gpu_bundle, gpu_rehearsal
from megatron_conan.errors import InputError
from megatron_conan.gpu_node.rehearsal import LOAD_CHECK, check_report, claim_workdir, judge_load
from megatron_conan.ops.soft_mask_attention.cuda_binding import EXTENSION_NAME

PINS = {"torch": "==2.11.0+cu130", "triton": "==3.6.0", "sentence-transformers": "==6.0.1"}


def _report(*parts, bundle=None, torch="2.11.0+cu130"):
    return {"bundle": bundle or {"used": True}, "parts": list(parts),
            "environment": {"torch": torch, "triton": "3.6.0", "sentence_transformers": "6.0.1"}}


def test_parts_that_ran_or_skipped_for_no_cuda_pass():
    report = _report({"part": "kernels", "status": "ran", "skipped": {"cuda": "no CUDA"}},
                     {"part": "stages", "status": "skipped", "reason": "no CUDA: needs NCCL"})
    assert check_report(report, PINS) == []


@pytest.mark.parametrize("part,problem", [
    ({"part": "stages", "status": "skipped", "reason": "100 s of the budget would be left for it, it needs 180 s"},
     "part stages skipped something for another reason than no CUDA: 100 s of the budget"),
    ({"part": "encode", "status": "partial", "reason": "stopped at its share of 40 s"}, "part encode partial"),
    ({"part": "train_step", "status": "failed", "reason": "exit 1: ModuleNotFoundError"}, "part train_step failed"),
    ({"part": "kernels", "status": "ran", "skipped": {"cuda": "the sm_90a build failed"}},
     "part kernels skipped something for another reason than no CUDA: the sm_90a build failed"),
])
def test_any_other_outcome_is_a_problem(part, problem):
    problems = check_report(_report(part), PINS)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_an_unused_bundle_or_another_torch_is_a_problem():
    problems = check_report(_report(bundle={"used": False, "reason": "every module the check loads is installed"},
                                    torch="2.13.0+cpu"), PINS)
    assert problems == ["the check did not use the bundle: every module the check loads is installed",
                        "the check ran torch 2.13.0+cpu, the node has 2.11.0"]


STAND_IN = """import sys
if "torch" not in sys.modules:  # as the built module: it links to torch's libraries
    raise ImportError("libc10.so: cannot open shared object file: No such file or directory")
if {driver!r}:
    raise ImportError("libcuda.so.1: cannot open shared object file: No such file or directory")
compiled_archs = "sm90a"
"""


@pytest.mark.parametrize("driver", [False, True])
def test_the_load_check_imports_torch_first_and_a_missing_driver_is_no_cuda(tmp_path, driver):
    """The rehearsal's load of the built extension (a stand-in module here) imports torch before it;
    on a machine without the GPU driver the module cannot load, which is "no CUDA", not a failure."""
    (tmp_path / f"{EXTENSION_NAME}.py").write_text(STAND_IN.format(driver=driver))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    loaded = subprocess.run([sys.executable, "-c", LOAD_CHECK], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), repo])})
    problems, said = judge_load(loaded.returncode, loaded.stdout, loaded.stderr)
    assert problems == [], loaded.stderr
    assert said.startswith("it is not loaded: no CUDA here (ImportError: libcuda.so.1" if driver
                           else "it loads: ('90a',) runs on sm_90: True"), said


@pytest.mark.parametrize("returncode,stdout,stderr,problem", [
    (1, "", "Traceback ...\nImportError: libc10.so: cannot open shared object file",
     "the built CUDA extension does not load: ImportError: libc10.so: cannot open shared object file"),
    (0, "('80',) runs on sm_90: False", "", "the built CUDA extension does not load: ('80',) runs on sm_90: False"),
])
def test_any_other_load_error_is_a_problem(returncode, stdout, stderr, problem):
    assert judge_load(returncode, stdout, stderr)[0] == [problem]


def test_a_work_directory_of_someone_else_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(InputError, match="holds files this tool did not make"):
        claim_workdir(str(tmp_path))
    claim_workdir(str(tmp_path / "new"))
    claim_workdir(str(tmp_path / "new"))  # its own: again


def test_bad_input_is_one_line_before_any_download(tmp_path, capsys):
    assert gpu_bundle.main(["--inventory", str(tmp_path / "none.txt")]) == 2
    assert capsys.readouterr().err.startswith("gpu-bundle: error: cannot read the node inventory ")
    (tmp_path / "notes.txt").write_text("keep")
    assert gpu_bundle.main(["--out", str(tmp_path)]) == 2
    assert "holds files this tool did not write (notes.txt)" in capsys.readouterr().err
    assert gpu_rehearsal.main(["--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("gpu-rehearsal: error: ")


def test_the_make_targets_call_the_tools():
    # --no-print-directory: under `make test` the parent make's MAKELEVEL makes a child print
    # "Entering directory" lines around its recipes
    dry = subprocess.run(["make", "-n", "--no-print-directory", "gpu-bundle", "gpu-rehearsal", "gpu-check",
                          "GPU_BUNDLE=/tmp/b", "REHEARSAL_DIR=/tmp/r", "REHEARSAL_SUITE=1", "REHEARSAL_NO_CUDA_BUILD=1",
                          f"CHECK_PYTHON={sys.executable}"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert dry == [f"{sys.executable} -m megatron_conan.cli.gpu_bundle --out /tmp/b",
                   f"{sys.executable} -m megatron_conan.cli.gpu_rehearsal --workdir /tmp/r --python python3.12 "
                   "--budget-s 300 --suite --no-cuda-build",
                   f"{sys.executable} -m megatron_conan.cli.gpu_check --budget-s 510 --out-dir . --bundle /tmp/b"]


def _clone(path):
    """A stand-in clone: a git checkout holding the extension's sources."""
    (path / "csrc").mkdir(parents=True)
    (path / "csrc" / "kernel.cu").write_text("// kernel\n")
    (path / "setup.py").write_text("# setup\n")
    binding = path / "megatron_conan" / "ops" / "soft_mask_attention"
    binding.mkdir(parents=True)
    (binding / "cuda_binding.py").write_text("# binding\n")
    subprocess.run(["git", "-C", str(path), "init", "-q"], check=True, capture_output=True)
    _commit(str(path))
    return str(path)


def _commit(clone):
    for command in (["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "sources"]):
        subprocess.run(["git", "-C", clone, *command], check=True, capture_output=True)


def test_a_cuda_build_is_kept_between_rehearsals_of_the_same_sources(tmp_path, monkeypatch):
    """The rehearsal's clone is fresh each run; its CUDA build (minutes on 2 cores) is kept in the
    work directory, keyed by the extension's sources and torch, and put into the next clone."""
    from megatron_conan.gpu_node import rehearsal
    from megatron_conan.ops.soft_mask_attention import cuda_build

    builds = []

    def build(arch, torch_version, seconds_left, repo, python):
        builds.append(repo)
        (Path(repo) / f"{EXTENSION_NAME}.cpython-312-x86_64-linux-gnu.so").write_text("module")
        return cuda_build.BuildResult(42.0, "")

    monkeypatch.setattr(rehearsal.shutil, "which", lambda name: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(cuda_build, "build", build)
    monkeypatch.setattr(rehearsal, "load_in_clone", lambda clone, python: (0, "('90a',) runs on sm_90: True", ""))
    said = []
    first, second = _clone(tmp_path / "one"), _clone(tmp_path / "two")
    work = str(tmp_path / "work")
    assert rehearsal.cuda_build_in_clone(first, sys.executable, said.append, work) == []
    assert rehearsal.cuda_build_in_clone(second, sys.executable, said.append, work) == []
    assert builds == [first]
    assert os.listdir(second).count(f"{EXTENSION_NAME}.cpython-312-x86_64-linux-gnu.so") == 1
    assert "built for sm_90a in 42 s" in said[0]
    assert "kept from an earlier rehearsal of the same sources (built in 42 s)" in said[1], said
    (tmp_path / "two" / "csrc" / "kernel.cu").write_text("// changed\n")
    _commit(second)
    assert rehearsal.cuda_build_in_clone(second, sys.executable, said.append, work) == []
    assert builds == [first, second]  # other sources: built again
