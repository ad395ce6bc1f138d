"""Issue 31 item 5: the CUDA extension's build inside the GPU check: for the GPU at hand only, on
every core, timed; a build that does not fit what its share leaves is skipped with the measured
reason (or stopped at the deadline and recorded), so the parts after it keep their time. A stand-in
setup.py plays nvcc (no GPU or CUDA toolkit needed)."""

import json
import os
import sys

import pytest

from megatron_conan.ops.soft_mask_attention import cuda_build


def _repo(tmp_path, body):
    (tmp_path / "setup.py").write_text("import json, os, sys, time\n" + body)
    return str(tmp_path)


def test_the_architecture_is_the_gpus_own():
    assert cuda_build.arch_for((9, 0)) == "90a" and cuda_build.arch_for((8, 0)) == "80"
    assert cuda_build.arch_for((10, 0)) == "100a"


def test_a_build_is_for_this_gpu_on_every_core_and_its_seconds_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_CONAN_SKIP_CUDA_EXT", "1")  # the build must not inherit a skip
    repo = _repo(tmp_path, "json.dump({k: os.environ.get(k) for k in ('CUDA_ARCHS', 'MAX_JOBS', "
                           "'MEGATRON_CONAN_SKIP_CUDA_EXT')} | {'argv': sys.argv[1:]}, open('env.json', 'w'))\n")
    built = cuda_build.build("90a", "2.11.0+cu130", 60, repo=repo)
    assert built.reason == "" and built.seconds is not None
    seen = json.loads((tmp_path / "env.json").read_text())
    assert seen == {"CUDA_ARCHS": "90a", "MAX_JOBS": str(os.cpu_count()), "MEGATRON_CONAN_SKIP_CUDA_EXT": None,
                    "argv": ["-q", "build_ext", "--inplace"]}
    timings = cuda_build.read_timings(repo)
    assert timings["90a torch 2.11.0+cu130"]["finished"] is True


def test_a_measured_build_longer_than_the_share_is_skipped_with_its_reason(tmp_path):
    repo = _repo(tmp_path, "open('ran', 'w').close()\n")
    os.makedirs(tmp_path / "build")
    (tmp_path / cuda_build.TIMINGS).write_text(json.dumps(
        {"90a torch 2.11.0": {"seconds": 95.0, "finished": True, "date": "2026-12-05"}}))
    skipped = cuda_build.build("90a", "2.11.0", 40, repo=repo)
    assert skipped.seconds is None and not (tmp_path / "ran").exists()
    assert skipped.reason == ("the sm_90a build took 95 s (2026-12-05), its share leaves 40 s: "
                              "build it before the check (docs/GPU.md)")
    assert cuda_build.build("90a", "2.11.0", 120, repo=repo).reason == ""  # a longer share builds


@pytest.mark.skipif(sys.platform != "linux", reason="process groups")
def test_a_build_past_its_deadline_is_stopped_and_remembered(tmp_path):
    repo = _repo(tmp_path, "time.sleep(60)\n")
    stopped = cuda_build.build("90a", "2.11.0", 1, repo=repo)
    assert stopped.reason.startswith("the sm_90a build had not finished when its share ended")
    assert cuda_build.read_timings(repo)["90a torch 2.11.0"]["finished"] is False
    again = cuda_build.build("90a", "2.11.0", 0.5, repo=repo)  # the next run does not try again
    assert again.seconds is None and "had not finished after 1 s" in again.reason


def test_a_failed_build_says_so_with_its_last_lines(tmp_path):
    repo = _repo(tmp_path, "print('nvcc fatal: unsupported gpu architecture'); sys.exit(1)\n")
    failed = cuda_build.build("90a", "2.11.0", 60, repo=repo)
    assert failed.reason == "the sm_90a build failed (exit 1): nvcc fatal: unsupported gpu architecture"
    assert cuda_build.read_timings(repo) == {}


def test_the_toolkit_is_the_one_holding_the_nvcc_on_path(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(toolkit / "bin"))
    assert cuda_build.cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", "/opt/site-cuda")
    assert cuda_build.cuda_home() == "/opt/site-cuda"


def test_the_kernels_part_builds_only_what_this_gpu_lacks(monkeypatch):
    """benchmarks/gpu_check_parts.py on a stand-in H100: a loadable build for it is kept; else the
    build for sm_90a runs with what the share leaves, and its seconds or its reason are reported."""
    import types

    import torch

    from benchmarks import gpu_check_parts
    from megatron_conan.ops.soft_mask_attention import cuda_binding

    gpu = types.SimpleNamespace(type="cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(cuda_binding, "is_available", lambda: True)
    monkeypatch.setattr(cuda_binding, "compiled_archs", lambda: ("90a",))
    assert gpu_check_parts._cuda_extension(gpu, 100) == ("", {"cuda build": "kept from an earlier run"})

    asked = []
    state = {"built": False}
    monkeypatch.setattr(cuda_binding, "is_available", lambda: state["built"])

    def build(arch, torch_version, seconds_left):
        asked.append((arch, seconds_left))
        state["built"] = True
        return cuda_build.BuildResult(42.0, "")

    monkeypatch.setattr(cuda_build, "build", build)
    assert gpu_check_parts._cuda_extension(gpu, 100) == ("", {"cuda build sm_90a s": 42.0})
    assert asked == [("90a", 100)]
    state["built"] = False
    monkeypatch.setattr(cuda_build, "build", lambda *args: cuda_build.BuildResult(None, "the sm_90a build took 95 s"))
    assert gpu_check_parts._cuda_extension(gpu, 40) == ("the sm_90a build took 95 s", {})
    assert gpu_check_parts._cuda_extension(types.SimpleNamespace(type="cpu"), 40) == ("no CUDA", {})
