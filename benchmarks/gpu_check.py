"""The one prepared GPU check (docs/GPU.md): every part in order within a time budget, each in a
child process of its own so that a part that overruns its share is stopped and the rest still run.

Parts, in order (docs/GPU.md):
  stages        every stage a few steps on one device (NCCL on a GPU): pretrain, SFT, embed-weak,
                embed-sup, export, evaluate (the quickstart's pipeline at a tiny plan, one rank)
  kernels       soft-mask kernels (Triton; the CUDA extension, built for this GPU only) against the
                fp64 reference at a in {0, 0.3, 1}, fp32 and bf16, forward and all input gradients
  kernel_speed  kernels against SDPA causal / full and FlexAttention (benchmarks/soft_mask_attention.py)
  train_step    pretraining tokens/s and MFU at the 1.4B width, a few layers (benchmarks/train_step.py)
  embed_step    stage-3 pairs/s against sentence-transformers' MNRL (benchmarks/embed_step.py)
  encode        texts/s of conan-encode's embedder against SentenceTransformer.encode (benchmarks/encode_throughput.py)

Each part gets a share of the time left (unused time passes on) and is skipped, with the reason,
when that share is below what it needs; a part still running at the end of its share is stopped
("partial", with the figures it wrote so far). Results: gpu_check.json and gpu_check.md (a table for
docs/PERFORMANCE.md). The entry point is conan-gpu-check (megatron_conan/cli/gpu_check.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    share: float
    """Weight of this part in the time left (renormalised over the parts still to run)."""
    min_s: float
    """Below this much time (GPU; CPU mode scales it) the part is skipped."""
    needs: tuple = ()
    """Modules the part imports; a missing one skips it with its name."""
    cpu_min_s: Optional[float] = None
    """`min_s` in CPU mode, where it differs from CPU_MIN_SCALE * min_s."""


PARTS = (
    # on 2 CPU cores the stages part spawns a world per stage: about 210 s in all (measured), so a
    # CPU budget too small for it skips it with the reason instead of stopping it half-way
    Part("stages", 0.35, 90, ("megatron.core", "sentencepiece", "sentence_transformers"), cpu_min_s=180),
    Part("kernels", 0.20, 30, ("triton",)),
    Part("kernel_speed", 0.10, 30),
    Part("train_step", 0.20, 60, ("megatron.core",)),
    Part("embed_step", 0.15, 60, ("megatron.core", "sentence_transformers")),
    Part("encode", 0.08, 45, ("megatron.core", "sentence_transformers")),
)
CPU_MIN_SCALE = 0.5  # tiny shapes need less than the GPU shapes' compile and warm-up


def _missing(modules) -> List[str]:
    missing = []
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except ModuleNotFoundError:
            missing.append(module)
    return missing


def _run_child(part: str, cpu: bool, seconds: float, scratch: str) -> Dict:
    """Run one part in a child process limited to `seconds`; its JSON result, or why there is none."""
    out = os.path.join(scratch, f"{part}.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
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


def run_check(budget_s: float, cpu: bool, out_dir: str, started: Optional[float] = None) -> Dict:
    """Run the parts in order within `budget_s` counted from `started` (a time.monotonic(), default
    now: the caller's start-up counts too); write gpu_check.json and gpu_check.md to `out_dir`."""
    started = time.monotonic() if started is None else started
    reserve_s = min(10.0, 0.05 * budget_s)  # for writing the results
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        for index, part in enumerate(PARTS):
            left = budget_s - reserve_s - (time.monotonic() - started)
            weights = sum(p.share for p in PARTS[index:])
            seconds = left * part.share / weights
            need = (part.cpu_min_s or part.min_s * CPU_MIN_SCALE) if cpu else part.min_s
            missing = _missing(part.needs)
            part_started = time.monotonic()
            if missing:
                result = {"status": "skipped", "reason": f"not installed: {', '.join(missing)}"}
            elif seconds < need:
                result = {"status": "skipped",
                          "reason": f"{seconds:.0f} s of the budget would be left for it, it needs {need:.0f} s"}
            else:
                result = _run_child(part.name, cpu, seconds, scratch)
            result.update(part=part.name, share_s=round(max(seconds, 0.0), 1),
                          wall_s=round(time.monotonic() - part_started, 1))
            results.append(result)
            print(f"gpu-check {part.name}: {result['status']}"  # user-facing: one line per part
                  + (f" ({result['reason']})" if result.get("reason") else "") + f", {result['wall_s']:.0f} s",
                  flush=True)
    report = {"date": datetime.date.today().isoformat(), "mode": "cpu" if cpu else "gpu", "budget_s": budget_s,
              "wall_s": round(time.monotonic() - started, 1), "environment": environment(cpu), "parts": results}
    write_results(report, out_dir)
    return report


def environment(cpu: bool) -> Dict[str, Optional[str]]:
    """Versions from the installed metadata: importing the libraries here would cost the budget."""
    from importlib import metadata

    import torch

    found = {"python": sys.version.split()[0], "torch": torch.__version__,
             "device": "CPU" if cpu or not torch.cuda.is_available() else torch.cuda.get_device_name()}
    for key, distribution in (("triton", "triton"), ("megatron.core", "megatron-core"),
                              ("transformer_engine", "transformer-engine"),
                              ("sentence_transformers", "sentence-transformers")):
        try:
            found[key] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[key] = None
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
