"""The GPU check's rehearsal on CPU against the node's exact packages (docs/GPU.md; `make gpu-rehearsal`).

Steps, each printed with its seconds:
  1. a Python venv of the node's inventory, pins as listed, from the package index (kept in the work
     directory and reused while the inventory is unchanged; its install cost is printed), less the
     distributions the node lacks that pip brought in as dependencies;
  2. a fresh clone of this checkout's HEAD;
  3. ``make gpu-bundle``'s builder in the clone (the connected side of the node's story);
  4. the import check: the bundle installed exactly as the check installs it on the node (no index,
     no dependencies, a private target) and every module the check's code imports, imported;
  5. where nvcc is installed, the CUDA extension's build for sm_90a (H100 / H200) against the node's
     torch, as the check's kernels part builds it, timed on this machine's cores, then loaded;
  6. ``conan-gpu-check --cpu --budget-s 300`` in the clone, with pip barred from any index: every
     part must run, or skip for lack of a GPU only ("no CUDA");
  7. with ``--suite``: the full test suite in the clone on the node venv, with the rest of the
     project's requirements (dev extras included) installed beside it the same offline way.
The work directory holds nothing the repository needs and lives outside it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Dict, List

from megatron_conan import atomic_write
from megatron_conan.errors import InputError
from megatron_conan.gpu_node import bundle
from megatron_conan.gpu_node.imports import check_imports, run_import_check
from megatron_conan.gpu_node.inventory import REPO, NodeInventory, project_requirements, read_inventory
from megatron_conan.ops.soft_mask_attention import cuda_binding, cuda_build

MARKER = ".megatron_conan-rehearsal"
"""In the work directory: it is this tool's, so its venv and clone may be replaced."""
NO_CUDA = "no CUDA"


@dataclasses.dataclass
class Rehearsal:
    workdir: str
    python: str = "python3.12"
    """The interpreter of the node's Python version, to make the venv from."""
    budget_s: float = 300.0
    suite: bool = False
    cuda_build: bool = True
    """Rehearse the CUDA extension's build where nvcc is installed (minutes on 2 cores)."""
    source: str = REPO
    say: Callable[[str], None] = print

    def __post_init__(self):
        self.workdir = os.path.abspath(self.workdir)  # the steps run in other directories

    def step(self, title: str, action: Callable[[], object]):
        started = time.monotonic()
        result = action()
        self.say(f"rehearsal: {title}: {time.monotonic() - started:.0f} s")  # user-facing progress
        return result

    def run(self) -> int:
        claim_workdir(self.workdir)
        inventory = read_inventory(os.path.join(self.source, "benchmarks", "gpu_node_inventory.txt"))
        venv_python = self.step("node venv", lambda: node_venv(inventory, self.workdir, self.python, self.say))
        clone = self.step("fresh clone", lambda: fresh_clone(self.source, os.path.join(self.workdir, "clone"), self.say))
        self.step("bundle", lambda: self.say("\n".join(build_in_clone(clone, venv_python))))
        self.step("import check", lambda: import_check(clone, venv_python, self.say))
        problems = self.step("cuda build", lambda: cuda_build_in_clone(
            clone, venv_python, self.say, self.workdir)) if self.cuda_build else []
        problems += self.step("gpu check", lambda: self.gpu_check(clone, venv_python))
        for problem in problems:
            self.say(f"rehearsal: FAILED: {problem}")
        if self.suite:
            self.step("full suite", lambda: problems.extend(run_suite(inventory, clone, venv_python, self.workdir, self.say)))
        self.say("rehearsal: " + ("passed" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0

    def gpu_check(self, clone: str, venv_python: str) -> List[str]:
        out = os.path.join(self.workdir, "check")
        os.makedirs(out, exist_ok=True)
        env = offline_env(PIP_NO_INDEX="1")
        subprocess.run([venv_python, "-m", "megatron_conan.cli.gpu_check", "--cpu", "--budget-s",
                        f"{self.budget_s:g}", "--out-dir", out], cwd=clone, env=env, check=False)
        with open(os.path.join(out, "gpu_check.json"), encoding="utf-8") as handle:
            report = json.load(handle)
        return check_report(report, inventory_versions(read_inventory(
            os.path.join(clone, "benchmarks", "gpu_node_inventory.txt"))))


def offline_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    env.pop("PYTHONPATH", None)  # only what the node would have
    return env


def claim_workdir(workdir: str) -> None:
    """Make `workdir` this tool's, or refuse one that holds anything else."""
    if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.exists(os.path.join(workdir, MARKER)):
        raise InputError(f"{workdir} holds files this tool did not make: name a new or empty directory")
    os.makedirs(workdir, exist_ok=True)
    atomic_write.text(os.path.join(workdir, MARKER), "made by megatron_conan.gpu_node.rehearsal\n")


def node_venv(inventory: NodeInventory, workdir: str, python: str, say: Callable[[str], None]) -> str:
    """The venv of the node's packages (made once per inventory); its interpreter."""
    venv = os.path.join(workdir, "node-venv")
    venv_python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, "inventory.json")
    wanted = {"requirements": inventory.pip_requirements(), "absent": list(inventory.absent), "python": inventory.python}
    if os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as handle:
            made = json.load(handle)
        if made["inventory"] == wanted:
            say(f"rehearsal: node venv {venv} reused (installed in {made['install_s']:.0f} s, {made['mib']:.0f} MiB)")
            return venv_python
    shutil.rmtree(venv, ignore_errors=True)  # inside this tool's work directory: its own venv
    _run([python, "-m", "venv", venv])
    _run([venv_python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    started = time.monotonic()
    _run([venv_python, "-m", "pip", "install", "--quiet", *inventory.pip_requirements()])
    install_s = time.monotonic() - started
    _run([venv_python, "-m", "pip", "uninstall", "--quiet", "--yes", *inventory.absent])  # absent ones: skipped
    mib = _tree_bytes(venv) / 2**20
    say(f"rehearsal: node venv installed from the index in {install_s:.0f} s, {mib:.0f} MiB")
    atomic_write.text(stamp, json.dumps({"inventory": wanted, "install_s": round(install_s, 1), "mib": round(mib)}))
    return venv_python


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
               if not os.path.islink(os.path.join(root, name)))


def _run(command: List[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise InputError(f"{' '.join(command[:4])} ... failed (exit {result.returncode}): {tail}")
    return result


def fresh_clone(source: str, dest: str, say: Callable[[str], None]) -> str:
    """A new clone of `source`'s HEAD at `dest` (replacing this tool's earlier clone)."""
    commit = _run(["git", "-C", source, "rev-parse", "HEAD"]).stdout.strip()
    if _run(["git", "-C", source, "status", "--porcelain", "--untracked-files=no"]).stdout.strip():
        say("rehearsal: the checkout has uncommitted changes: the clone holds HEAD only")
    shutil.rmtree(dest, ignore_errors=True)  # inside this tool's work directory: its own clone
    _run(["git", "clone", "--quiet", "--no-hardlinks", source, dest])
    _run(["git", "-C", dest, "checkout", "--quiet", commit])
    say(f"rehearsal: cloned {commit[:12]} into {dest}")
    return dest


def build_in_clone(clone: str, venv_python: str) -> List[str]:
    """`make gpu-bundle` in the clone, with the node venv's pip: its printed lines."""
    result = _run([venv_python, "-m", "megatron_conan.cli.gpu_bundle", "--out", "gpu-bundle"], cwd=clone,
                  env=dict(offline_env(), PYTHONPATH=clone))
    return result.stdout.rstrip().splitlines()


def import_check(clone: str, venv_python: str, say: Callable[[str], None]) -> None:
    """Every module the check's code imports imports on the node venv with the bundle beside it."""
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_target_") as scratch:
        target = bundle.site_dir(scratch)
        bundle.install_bundle(os.path.join(clone, "gpu-bundle"), target, python=venv_python)
        modules = check_imports(clone)
        failed = run_import_check(modules, python=venv_python, path=[target], cwd=clone, env=offline_env())
    if failed:
        raise InputError("on the node's packages plus the bundle these do not import: "
                         + "; ".join(f"{name} ({why})" for name, why in sorted(failed.items())))
    say(f"rehearsal: {len(modules.required)} modules of {len(modules.top_level)} top-level packages import "
        f"({', '.join(modules.top_level)}); optional: {', '.join(modules.optional)}")


def cuda_build_in_clone(clone: str, venv_python: str, say: Callable[[str], None], workdir: str,
                        arch: str = "90a") -> List[str]:
    """Build the extension for `arch` in the clone as the check does, or put in the one an earlier
    rehearsal built from the same sources against the same torch (kept in `workdir`: minutes on 2
    cores); problems, [] where it loads (or where there is no nvcc to try)."""
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        say("rehearsal: no nvcc here: the CUDA extension's build is not rehearsed")
        return []
    torch_version = _run([venv_python, "-c", "import torch; print(torch.__version__)"]).stdout.strip()
    kept = kept_build_dir(workdir, clone, arch, torch_version)
    how = _built_from(kept, clone)
    if how is None:
        built = cuda_build.build(arch, torch_version, seconds_left=1200, repo=clone, python=venv_python)
        if built.reason:
            return [f"the CUDA extension: {built.reason}"]
        _keep_build(clone, kept, built.seconds)
        how = f"built for sm_{arch} in {built.seconds:.0f} s on {os.cpu_count()} cores"
    problems, said = judge_load(*load_in_clone(clone, venv_python))
    say(f"rehearsal: CUDA extension {how} (torch {torch_version}); {said}")
    return problems


def kept_build_dir(workdir: str, clone: str, arch: str, torch_version: str) -> str:
    """Where a build of the clone's extension sources (csrc/, setup.py and the binding it reads) for
    `arch` against `torch_version` is kept between rehearsals."""
    sources = _run(["git", "-C", clone, "rev-parse", "HEAD:csrc", "HEAD:setup.py",
                    "HEAD:megatron_conan/ops/soft_mask_attention/cuda_binding.py"]).stdout.split()
    key = hashlib.sha256(" ".join([*sources, arch, torch_version]).encode()).hexdigest()[:16]
    return os.path.join(workdir, "cuda-builds", key)


def _built_from(kept: str, clone: str):
    """Copy a kept build into the clone; how it was made, or None where none is kept."""
    modules = glob.glob(os.path.join(kept, cuda_binding.EXTENSION_NAME + "*.so"))
    if not modules:
        return None
    for module in modules:
        shutil.copy2(module, clone)
    with open(os.path.join(kept, "build.json"), encoding="utf-8") as handle:
        seconds = json.load(handle)["seconds"]
    return f"kept from an earlier rehearsal of the same sources (built in {seconds:.0f} s)"


def _keep_build(clone: str, kept: str, seconds: float) -> None:
    os.makedirs(kept, exist_ok=True)
    for module in glob.glob(os.path.join(clone, cuda_binding.EXTENSION_NAME + "*.so")):
        shutil.copy2(module, kept)
    atomic_write.text(os.path.join(kept, "build.json"), json.dumps({"seconds": round(seconds, 1)}))


def load_in_clone(clone: str, venv_python: str):
    """(exit status, stdout, stderr) of LOAD_CHECK in the clone on the node venv."""
    loaded = subprocess.run([venv_python, "-c", LOAD_CHECK], cwd=clone, capture_output=True, text=True)
    return loaded.returncode, loaded.stdout, loaded.stderr


LOAD_CHECK = ("import torch, importlib\n"  # torch first: its libraries (libc10.so ...) are what the module links to
              "from megatron_conan.ops.soft_mask_attention import cuda_binding as b\n"
              "importlib.import_module(b.EXTENSION_NAME)  # load_extension() would hide the import error\n"
              "print(b.compiled_archs(), 'runs on sm_90:', b.runs_on((9, 0), b.compiled_archs()))\n")
"""Loads the built extension as the binding does (torch imported first), raising its import error."""
NO_DRIVER = "libcuda.so"


def judge_load(returncode: int, stdout: str, stderr: str):
    """(problems, what to say) of LOAD_CHECK's run: it loads and runs on sm_90; or it cannot load
    on this machine for lack of the GPU driver (libcuda.so.1), a skip for "no CUDA", not a failure;
    any other load error, or a build that would not run on sm_90, is a problem."""
    error = (stderr.strip().splitlines() or [""])[-1]
    if returncode == 0 and "runs on sm_90: True" in stdout:
        return [], f"it loads: {stdout.strip()}"
    if returncode != 0 and NO_DRIVER in error:
        return [], f"it is not loaded: {NO_CUDA} here ({error})"
    why = error if returncode != 0 else stdout.strip()
    return [f"the built CUDA extension does not load: {why}"], f"it does not load: {why}"


def inventory_versions(inventory: NodeInventory) -> Dict[str, str]:
    """{name: specifier} of the pinned inventory entries the check's report names."""
    return {req.name: str(req.specifier) for req in inventory.requirements if req.specifier}


def check_report(report: Dict, pins: Dict[str, str]) -> List[str]:
    """Why the rehearsal's check report fails: a part that neither ran nor skipped for lack of a GPU,
    a sub-row skipped for another reason, no bundle used, or versions that are not the node's."""
    problems = []
    if not report.get("bundle", {}).get("used"):
        problems.append(f"the check did not use the bundle: {report.get('bundle', {}).get('reason')}")
    for part in report["parts"]:
        reasons = [part.get("reason") or ""] if part["status"] == "skipped" else []
        if part["status"] not in ("ran", "skipped"):
            problems.append(f"part {part['part']} {part['status']}: {part.get('reason')}")
        reasons += list((part.get("skipped") or {}).values())
        problems += [f"part {part['part']} skipped something for another reason than {NO_CUDA}: {why}"
                     for why in reasons if NO_CUDA not in why]
    env = report.get("environment", {})
    for name, key in (("torch", "torch"), ("triton", "triton"), ("sentence-transformers", "sentence_transformers")):
        wanted = pins.get(name, "").lstrip("=").split("+")[0]
        if wanted and not str(env.get(key) or "").startswith(wanted):
            problems.append(f"the check ran {name} {env.get(key)}, the node has {wanted}")
    return problems


def run_suite(inventory: NodeInventory, clone: str, venv_python: str, workdir: str,
              say: Callable[[str], None]) -> List[str]:
    """The full suite on the node venv plus the rest of the project's requirements, installed offline."""
    install_requires, extras = project_requirements(os.path.join(clone, "setup.py"))
    wheels, deps_parent = os.path.join(workdir, "suite-wheels"), os.path.join(workdir, "suite-deps")
    deps = bundle.site_dir(deps_parent)
    manifest = bundle.build_bundle(wheels, inventory, install_requires + extras["dev"], None,
                                   python=venv_python, limit_mib=None)
    say(f"rehearsal: suite requirements: {len(manifest['wheels'])} wheels, {manifest['total_bytes'] / 2**20:.0f} MiB")
    shutil.rmtree(deps_parent, ignore_errors=True)  # inside this tool's work directory
    bundle.install_bundle(wheels, deps, python=venv_python)
    log = os.path.join(workdir, "suite.log")
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run([venv_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=900",
                                 "-n", "2", "--dist", "loadfile", "tests"], cwd=clone, stdout=handle,
                                stderr=subprocess.STDOUT, env=dict(offline_env(), PYTHONPATH=os.pathsep.join([deps, clone])))
    with open(log, encoding="utf-8") as handle:
        summary = handle.read().strip().splitlines()[-1:]
    say(f"rehearsal: full suite in {time.monotonic() - started:.0f} s: {' '.join(summary)} (log {log})")
    return [] if result.returncode == 0 else [f"the full suite failed: {' '.join(summary)}"]


def default_workdir() -> str:
    """Outside the repository: the venv alone is several GiB."""
    return os.path.join(os.path.expanduser("~"), ".cache", "megatron_conan", "gpu-rehearsal")
