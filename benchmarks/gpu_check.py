"""The one prepared GPU check (docs/GPU.md): every part in order within a time budget, each in a
child process of its own so that a part that overruns its share is stopped and the rest still run.

Parts, in order (docs/GPU.md), what only a GPU can tell first:
  kernels       soft-mask kernels (Triton; the CUDA extension, built for this GPU only, inside this
                part's share) against the fp64 reference at a in {0, 0.3, 1}, fp32 and bf16,
                forward and all input gradients
  kernel_speed  kernels against SDPA causal / full and FlexAttention (benchmarks/soft_mask_attention.py)
  train_step    pretraining tokens/s and MFU at the 1.4B width, a few layers (benchmarks/train_step.py)
  embed_step    stage-3 pairs/s against sentence-transformers' MNRL (benchmarks/embed_step.py)
  encode        texts/s of conan-encode's embedder against SentenceTransformer.encode (benchmarks/encode_throughput.py)
  stages        every stage a few steps on one device (NCCL on a GPU): pretrain, SFT, embed-weak,
                embed-sup, export, evaluate (the quickstart's pipeline at a tiny plan, one rank)

Where a module the check loads is missing (a GPU node without megatron-core or pydantic), the
offline bundle of `make gpu-bundle` is installed into a temporary directory that leads the parts'
PYTHONPATH (megatron_conan/gpu_node/bundle.py); the report says so.

Each part gets its weight's share of the time left (unused time passes on; on a GPU its `share`, on
CPU its measured `cpu_s`), or what it needs where that is more and the time left still holds it (the
order is the priority); it is skipped, with the reason, when the time left is below what it needs; a
part still running at the end of its share is stopped ("partial", with the figures it wrote so far).
Results: gpu_check.json and gpu_check.md (a table for docs/PERFORMANCE.md). The entry point is conan-gpu-check (megatron_conan/cli/gpu_check.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.machinery
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUNDLE = os.path.join(REPO, "gpu-bundle")
"""`make gpu-bundle`'s output: the wheels of what the check loads and the GPU node lacks."""


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    share: float
    """Weight of this part in the time left on a GPU (renormalised over the parts still to run)."""
    min_s: float
    """Below this much time on a GPU the part is skipped."""
    needs: tuple = ()
    """Modules the part imports; a missing one skips it with its name."""
    cpu_s: float = 0.0
    """Seconds of its CPU shapes on 2 quiet cores (docs/GPU.md, measured): in --cpu mode both its
    weight in the time left and the least it is started with (a part given less would only be stopped)."""
    expected_s: float = 0.0
    """Estimated seconds on one H100 (docs/GPU.md): not measured, no GPU was lent to this work; the
    CPU rehearsal and the CUDA build measured there are what they rest on."""

    def weight(self, cpu: bool) -> float:
        return self.cpu_s if cpu else self.share

    def need_s(self, cpu: bool) -> float:
        return self.cpu_s if cpu else self.min_s


PARTS = (
    # what only a GPU can tell comes first: kernel correctness (its share holds the CUDA extension's
    # build when it is not built yet: cuda_build.py), kernel speed, the 1.4B step's MFU, stage-3 and
    # encoding throughput; the stages, which the CPU suite already runs end to end, come last with
    # what is left. On CPU every part runs its own tiny shapes (benchmarks/gpu_check_parts.py); its
    # cpu_s is what they took on 2 quiet cores with the node's versions (docs/GPU.md, the rehearsal),
    # mostly imports and process start-up (the stages part spawns a world per stage).
    Part("kernels", 0.30, 30, ("triton",), cpu_s=5, expected_s=130),  # sm_90a build ~100 s, then 24 checks
    Part("kernel_speed", 0.10, 30, cpu_s=5, expected_s=40),
    Part("train_step", 0.15, 60, ("megatron.core", "pydantic"), cpu_s=13, expected_s=60),
    Part("embed_step", 0.18, 60, ("megatron.core", "pydantic", "sentence_transformers"), cpu_s=20, expected_s=90),
    Part("encode", 0.10, 45, ("megatron.core", "pydantic", "sentence_transformers"), cpu_s=18, expected_s=45),
    Part("stages", 0.17, 90, ("megatron.core", "pydantic", "sentencepiece", "sentence_transformers", "pytrec_eval",
                              "bm25s"), cpu_s=75, expected_s=110),
)


def _missing(modules, path: Sequence[str] = ()) -> List[str]:
    """The `modules` (dotted names) that neither this interpreter's path nor `path` holds, found
    without importing them (an import here would cost the budget)."""
    return [module for module in modules if not _findable(module, list(path) + sys.path)]


def _findable(module: str, search: List[str]) -> bool:
    fullname = ""
    for name in module.split("."):
        fullname = f"{fullname}.{name}" if fullname else name
        spec = importlib.machinery.PathFinder.find_spec(fullname, search)
        if spec is None:
            return False
        search = list(spec.submodule_search_locations or [])
    return True


def use_bundle(bundle_dir: str, target: str) -> Dict:
    """Install the offline bundle into `target` when a module the check loads is missing (docs/GPU.md):
    no index, no dependencies, nothing system-wide. What was done, for the report."""
    from megatron_conan.errors import InputError
    from megatron_conan.gpu_node.bundle import install_bundle
    from megatron_conan.gpu_node.imports import check_imports

    missing = _missing(check_imports(REPO).top_level)
    if not missing:
        return {"used": False, "reason": "every module the check loads is installed"}
    started = time.monotonic()
    try:
        wheels = install_bundle(bundle_dir, target)
    except InputError as error:
        return {"used": False, "missing": missing, "reason": str(error)}
    return {"used": True, "dir": os.path.abspath(bundle_dir), "target": target, "missing": missing,
            "wheels": wheels, "install_s": round(time.monotonic() - started, 1),
            "how": "pip install --no-index --no-deps --target <target>; <target> leads the parts' PYTHONPATH"}


def _run_child(part: str, cpu: bool, seconds: float, scratch: str, path: Sequence[str] = ()) -> Dict:
    """Run one part in a child process limited to `seconds`, with `path` (the bundle) leading its
    PYTHONPATH; its JSON result, or why there is none."""
    out = os.path.join(scratch, f"{part}.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [*path, REPO, os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if cpu:
        env["TRITON_INTERPRET"] = "1"  # Triton's kernels on CPU tensors (must precede triton's import)
    command = [sys.executable, "-m", "benchmarks.gpu_check_parts", part, "--out", out,
               "--scratch", os.path.join(scratch, part), "--seconds", f"{seconds:.0f}"] + (["--cpu"] if cpu else [])
    # its own process group: a part stopped at its share takes the ranks it spawned with it, so they
    # do not run on into the next part's time. Its output goes to a file, not a pipe: helper
    # processes it leaves behind (megatron-core's checkpoint writer) would hold a pipe open.
    log_path = os.path.join(scratch, f"{part}.log")
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            child.wait(timeout=seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the part and whatever it left running
        except ProcessLookupError:
            pass
        child.wait()
    with open(log_path, encoding="utf-8", errors="replace") as log:
        output = log.read()
    if timed_out:
        stopped = {"status": "partial", "reason": f"stopped at its share of {seconds:.0f} s"}
        if os.path.exists(out):  # a part that writes as it goes keeps what it measured
            with open(out, encoding="utf-8") as handle:
                figures = json.load(handle).get("figures")
            stopped.update(figures=figures, reason=f"{stopped['reason']}, after {len(figures)} figures")
        return stopped
    if child.returncode != 0 or not os.path.exists(out):
        tail = output.strip().splitlines()[-3:]
        return {"status": "failed", "reason": f"exit {child.returncode}: " + " | ".join(tail)}
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


def run_check(budget_s: float, cpu: bool, out_dir: str, started: Optional[float] = None,
              bundle_dir: str = DEFAULT_BUNDLE) -> Dict:
    """Run the parts in order within `budget_s` counted from `started` (a time.monotonic(), default
    now: the caller's start-up counts too), with the offline bundle in `bundle_dir` where a module is
    missing; write gpu_check.json and gpu_check.md to `out_dir`."""
    from megatron_conan.gpu_node.bundle import site_dir

    started = time.monotonic() if started is None else started
    # for what follows the last part (the scratch's removal, the results): at least 3 s, since a
    # loaded machine takes that long, so that the wall time stays within the budget
    reserve_s = min(10.0, max(3.0, 0.05 * budget_s))
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        bundle = use_bundle(bundle_dir, site_dir(os.path.join(scratch, "bundle")))
        path = [bundle["target"]] if bundle["used"] else []
        env = environment(cpu, path)  # before the parts: nothing but the results after the last
        print(f"gpu-check bundle: {_bundle_line(bundle)}", flush=True)  # user-facing
        for index, part in enumerate(PARTS):
            seconds = share_of(index, budget_s - reserve_s - (time.monotonic() - started), cpu)
            part_started = time.monotonic()
            result = _run_part(part, cpu, seconds, scratch, path)
            result.update(part=part.name, share_s=round(max(seconds, 0.0), 1),
                          wall_s=round(time.monotonic() - part_started, 1))
            results.append(result)
            print(f"gpu-check {part.name}: {result['status']}"  # user-facing: one line per part
                  + (f" ({result['reason']})" if result.get("reason") else "") + f", {result['wall_s']:.0f} s",
                  flush=True)
    report = {"date": datetime.date.today().isoformat(), "mode": "cpu" if cpu else "gpu", "budget_s": budget_s,
              "wall_s": round(time.monotonic() - started, 1), "environment": env, "bundle": bundle, "parts": results}
    write_results(report, out_dir)
    return report


def share_of(index: int, left_s: float, cpu: bool = False) -> float:
    """The seconds part `index` gets of the `left_s` still left at its turn: its weight's share of
    them, or, where that is below what it needs and `left_s` still holds that, what it needs: the
    order is the priority, so a short budget runs the first parts whole and skips the last ones
    rather than stopping every part half-way."""
    part = PARTS[index]
    proportional = left_s * part.weight(cpu) / sum(later.weight(cpu) for later in PARTS[index:])
    need = part.need_s(cpu)
    return need if proportional < need <= left_s else proportional


def _bundle_line(bundle: Dict) -> str:
    if not bundle["used"]:
        return f"not used ({bundle['reason']})"
    return (f"{len(bundle['wheels'])} wheels installed in {bundle['install_s']:.0f} s into {bundle['target']} "
            f"for {', '.join(bundle['missing'])}")


def _run_part(part: Part, cpu: bool, seconds: float, scratch: str, path: Sequence[str]) -> Dict:
    need = part.need_s(cpu)
    missing = _missing(part.needs, path)
    if missing:
        return {"status": "skipped", "reason": f"not installed: {', '.join(missing)} (make gpu-bundle, docs/GPU.md)"}
    if seconds < need:
        return {"status": "skipped",
                "reason": f"{seconds:.0f} s of the budget would be left for it, it needs {need:.0f} s"}
    return _run_child(part.name, cpu, seconds, scratch, path)


def environment(cpu: bool, path: Sequence[str] = ()) -> Dict[str, Optional[str]]:
    """Versions from the installed metadata (`path`, the bundle, first): importing the libraries here
    would cost the budget."""
    from importlib import metadata

    import torch

    found = {"python": sys.version.split()[0], "torch": torch.__version__,
             "device": "CPU" if cpu or not torch.cuda.is_available() else torch.cuda.get_device_name()}
    for key, distribution in (("triton", "triton"), ("megatron.core", "megatron-core"),
                              ("transformer_engine", "transformer-engine"),
                              ("sentence_transformers", "sentence-transformers"), ("transformers", "transformers")):
        versions = [dist.version for dist in metadata.distributions(name=distribution, path=[*path, *sys.path])]
        found[key] = versions[0] if versions else None
    return found


def markdown_table(report: Dict) -> str:
    """The table for docs/PERFORMANCE.md: one row per part and figure."""
    env = report["environment"]
    lines = [f"GPU check, {report['date']}, {env['device']}, torch {env['torch']}, triton {env.get('triton')}, "
             f"megatron-core {env.get('megatron.core')}, budget {report['budget_s']:.0f} s, "
             f"wall {report['wall_s']:.0f} s (`conan-gpu-check"
             f"{' --cpu' if report['mode'] == 'cpu' else ''} --budget-s {report['budget_s']:.0f}`)", "",
             "| part | status | figure | value |", "|---|---|---|---|"]
    for part in report["parts"]:
        figures = part.get("figures") or {}
        status = part["status"] + (f": {part['reason']}" if part.get("reason") else "")
        if not figures:
            lines.append(f"| {part['part']} | {status} | | |")
        for name, value in figures.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {part['part']} | {status} | {name} | {shown} |")
            status = ""
    return "\n".join(lines) + "\n"


def write_results(report: Dict, out_dir: str) -> None:
    from megatron_conan.eval.text_io import write_atomically

    os.makedirs(out_dir, exist_ok=True)

    def write_text(text):
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
        return write

    write_atomically(os.path.join(out_dir, "gpu_check.json"), write_text(json.dumps(report, indent=2) + "\n"))
    write_atomically(os.path.join(out_dir, "gpu_check.md"), write_text(markdown_table(report)))
