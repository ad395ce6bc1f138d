"""Builds the CUDA extension (csrc/) in the source tree for one GPU architecture, timed, within a
deadline (docs/GPU.md: the GPU check builds it inside the kernels part's share).

    CUDA_ARCHS=90a MAX_JOBS=<cores> python setup.py build_ext --inplace

The module lands in the repository root (``megatron_conan_soft_mask_cuda*.so``, git-ignored) and
stays there, so a later run that finds it loadable for this GPU skips the build. Each build's
measured seconds go to ``build/soft_mask_cuda_build.json`` ({"<arch> torch <version>": {"seconds",
"finished", "date"}}): a run whose share is shorter than the last measured build skips the CUDA row
with that reason instead of starting a build that would eat the parts after it. A build stopped at
its deadline is recorded as unfinished, with the seconds it had (a lower bound).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TIMINGS = os.path.join("build", "soft_mask_cuda_build.json")


@dataclasses.dataclass(frozen=True)
class BuildResult:
    seconds: Optional[float]
    """Wall seconds of this build; None when none was started."""
    reason: str
    """'' when the extension was built; else why not."""


def arch_for(capability) -> str:
    """setup.py's name of the architecture of a GPU of compute `capability`: "90a" for (9, 0) (the
    arch-specific Hopper build the kernel is tuned for), "80" for (8, 0)."""
    major, minor = capability
    return f"{major}{minor}" + ("a" if major >= 9 else "")


def timing_key(arch: str, torch_version: str) -> str:
    return f"{arch} torch {torch_version}"


def read_timings(repo: str = REPO) -> Dict[str, Dict]:
    try:
        with open(os.path.join(repo, TIMINGS), encoding="utf-8") as handle:
            found = json.load(handle)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _record(repo: str, key: str, seconds: float, finished: bool) -> None:
    from megatron_conan import atomic_write

    timings = read_timings(repo)
    timings[key] = {"seconds": round(seconds, 1), "finished": finished, "date": datetime.date.today().isoformat()}
    os.makedirs(os.path.join(repo, "build"), exist_ok=True)
    atomic_write.text(os.path.join(repo, TIMINGS), json.dumps(timings, indent=2) + "\n")


def cuda_home() -> Optional[str]:
    """The CUDA toolkit to build with: CUDA_HOME, else the one holding the nvcc on PATH, else
    /usr/local/cuda. torch guesses the nvcc's grandparent, which is wrong where nvcc on PATH is a
    wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc): no headers, no libcudart."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    return next((home for home in candidates if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))), None)


def build(arch: str, torch_version: str, seconds_left: float, repo: str = REPO,
          python: str = sys.executable) -> BuildResult:
    """Build for `arch` alone on every core unless the last measured build (or this one) takes longer
    than `seconds_left`."""
    key = timing_key(arch, torch_version)
    last = read_timings(repo).get(key)
    if last and last["seconds"] > seconds_left:
        measured = f"{'took' if last['finished'] else 'had not finished after'} {last['seconds']:.0f} s"
        return BuildResult(None, f"the sm_{arch} build {measured} ({last['date']}), its share leaves "
                                 f"{max(seconds_left, 0):.0f} s: build it before the check (docs/GPU.md)")
    env = dict(os.environ, CUDA_ARCHS=arch, MAX_JOBS=str(os.cpu_count() or 1))
    home = cuda_home()
    if home:
        env["CUDA_HOME"] = home
    env.pop("MEGATRON_CONAN_SKIP_CUDA_EXT", None)
    started = time.monotonic()
    # its own session: a build stopped at the deadline takes nvcc and ninja's compilers with it
    child = subprocess.Popen([python, "setup.py", "-q", "build_ext", "--inplace"], cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=max(1.0, seconds_left))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        elapsed = time.monotonic() - started
        _record(repo, key, elapsed, finished=False)
        return BuildResult(elapsed, f"the sm_{arch} build had not finished when its share ended ({elapsed:.0f} s)")
    elapsed = time.monotonic() - started
    if child.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-2:])
        return BuildResult(elapsed, f"the sm_{arch} build failed (exit {child.returncode}): {tail}")
    _record(repo, key, elapsed, finished=True)
    return BuildResult(elapsed, "")
