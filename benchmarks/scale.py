"""How cost grows: every data and tooling step at four or more sizes, fitted and carried to the paper's scale.

    python -m benchmarks.scale [--out-dir runs/scale] [--steps preprocess mining_exact ...] [--quick]
    make scale-bench

Each (step, size) runs in a fresh process (``--child``) that builds its inputs first (generated
text that never repeats, cached in ``--out-dir/data``; benchmarks/scale_data.py), then times the
step alone while a sampler thread reads the resident memory of the process and its workers every
10 ms. Per run: wall seconds, peak resident bytes above the process's own before the step
(``peak_rss_delta``; the absolute peak is kept too), and output bytes. Per step: growth exponents
of each (the log-log slope between the two largest sizes, where fixed start-up costs matter
least), extrapolated to the paper's size in the step's unit, and a log-log PNG.

Output: ``--out-dir/scale.json`` (every run, fit and extrapolation, the machine and its load) and
``--out-dir/<step>.png``. docs/SCALE.md reads them. Timings on a shared machine vary with its load;
exponents much less so. ``--quick`` runs tiny sizes (the test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy

from benchmarks import scale_steps

GIB = float(1 << 30)


@dataclasses.dataclass
class Step:
    """One row of docs/SCALE.md: what grows, its sizes here, and its size in the paper's run."""

    run: Callable[[str, int, Callable], dict]
    """(data dir, size, measure) -> {"output_bytes", ...}: sets up untimed, times what it passes to
    ``measure`` (benchmarks/scale_steps.py)."""
    unit: str
    sizes: Sequence[int]
    paper_size: float
    paper_what: str
    time_size: Optional[float] = None
    """Units whose work the paper's time is (default paper_size): the preprocessing steps' time
    follows tokens (3T = 3.75e10 of these 80-token documents), their memory documents (5e9 of 600
    tokens, closer to web and news text)."""
    uses_cores: bool = False
    """Spreads over the cores (workers, BLAS or faiss threads): time on a node = time here x 2 / 64."""
    node_copies: int = 1
    """Copies a training node runs at once (8: one per GPU rank): its memory counts that often."""


LARGE = (300, 3_000, 30_000, 300_000)
"""Sizes of the steps that stay fast per item (pass --sizes-scale 10 on a quiet machine: the
largest then makes per-item memory, a 12-byte index entry a document, stand out more)."""

STEPS: Dict[str, Step] = {
    "preprocess": Step(scale_steps.preprocess, "documents", LARGE, 5e9,
                       "3T tokens: time as 3.75e10 of these 80-token documents, memory as 5e9 of 600",
                       time_size=3e12 / 80, uses_cores=True),
    "pretrain_index_cold": Step(scale_steps.pretrain_index_cold, "documents", LARGE, 5e9,
                                "3T tokens in 5e9 documents, two blended sources, one epoch",
                                time_size=3e12 / 80),
    "pretrain_index_cached": Step(scale_steps.pretrain_index_cached, "documents", LARGE, 5e9,
                                  "as above, the index caches on disk", time_size=3e12 / 80, node_copies=8),
    "sft": Step(scale_steps.sft, "examples", (300, 3_000, 30_000, 300_000), 1e7, "10M supervised examples"),
    "contrastive_tokenize": Step(scale_steps.contrastive_tokenize, "pairs", LARGE, 1.7e9,
                                 "1.7B weak pairs", uses_cores=True),
    "contrastive_open": Step(scale_steps.contrastive_open, "pairs", LARGE, 1.7e9,
                             "1.7B weak pairs, one loader per rank", node_copies=8),
    "contrastive_access": Step(scale_steps.contrastive_access, "pairs", LARGE, 1.7e9,
                               "1.7B weak pairs: 2,000 random examples read", node_copies=8),
    "dhnm": Step(scale_steps.dhnm, "examples", (10_000, 100_000, 1_000_000, 10_000_000), 1e7,
                 "10M supervised examples, K = 7", node_copies=8),
    "mining_exact_corpus": Step(scale_steps.mining_exact_corpus, "corpus texts",
                                (1_000, 10_000, 100_000, 1_000_000), 1e7, "10M passages (1,000 queries here)",
                                uses_cores=True),
    "mining_exact_queries": Step(scale_steps.mining_exact_queries, "queries", (100, 1_000, 10_000, 100_000), 6e6,
                                 "6M queries (retrieval + CLR) over a 100,000-text corpus", uses_cores=True),
    "mining_ann_corpus": Step(scale_steps.mining_ann_corpus, "corpus texts", (300, 3_000, 30_000, 300_000),
                              1e7, "10M passages, faiss IVF index (1,000 queries here)", uses_cores=True),
    "mining_ann_queries": Step(scale_steps.mining_ann_queries, "queries", (100, 1_000, 10_000, 100_000), 6e6,
                               "6M queries over a 100,000-text corpus, faiss IVF index", uses_cores=True),
    "encode": Step(scale_steps.encode, "texts", (100, 1_000, 10_000, 100_000), 1e7,
                   "10M texts (a tiny model here: the exponent, not the time, carries over)", uses_cores=True),
    "search": Step(scale_steps.search, "corpus texts", (1_000, 10_000, 100_000, 1_000_000), 8.8e6,
                   "8.8M passages (MS MARCO's size), 1,000 queries", uses_cores=True),
}
QUICK_SIZES = (20, 60, 180, 540)


# -- the child: one (step, size) --------------------------------------------------------------

class TreeMemorySampler:
    """Peak resident bytes of this process and its descendants, sampled on a thread: all of it
    (``peak``) and the private part (``peak_private``: resident minus file-backed shared pages, such
    as a memory-mapped dataset that every rank of a node maps once)."""

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self.process, self.interval_s = psutil.Process(), interval_s
        self.peak, self.peak_private = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def current(self) -> tuple:
        """(resident, private) bytes of the process tree now."""
        import psutil

        total = private = 0
        for process in [self.process] + self.process.children(recursive=True):
            try:
                info = process.memory_info()
            except psutil.Error:  # a worker that just exited
                continue
            total += info.rss
            private += info.rss - getattr(info, "shared", 0)
        return total, private

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            total, private = self.current()
            self.peak, self.peak_private = max(self.peak, total), max(self.peak_private, private)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        total, private = self.current()
        self.peak, self.peak_private = max(self.peak, total), max(self.peak_private, private)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and of its children that ended
    (the worker pools end before a step returns): the work, which a loaded machine does not stretch
    the way it stretches wall time."""
    import resource

    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_child(step: str, size: int, data_dir: str) -> dict:
    """Set up, then time `step` at `size` under the memory sampler (benchmarks/scale_steps.py)."""
    os.makedirs(data_dir, exist_ok=True)
    record: dict = {}

    def measure(body: Callable[[], dict]) -> dict:
        sampler = TreeMemorySampler()
        baseline, baseline_private = sampler.current()
        cpu_started = _cpu_seconds()
        started = time.perf_counter()
        with sampler:
            result = body()
        record.update(seconds=time.perf_counter() - started, cpu_seconds=_cpu_seconds() - cpu_started,
                      baseline_rss=baseline, peak_rss=sampler.peak,
                      peak_rss_delta=max(sampler.peak - baseline, 0), baseline_private=baseline_private,
                      peak_private_delta=max(sampler.peak_private - baseline_private, 0))
        return result

    extra = STEPS[step].run(data_dir, size, measure)
    return {"step": step, "size": size, **record, **extra}


# -- the parent: sizes, fits, extrapolation, plots ----------------------------------------------

FIT_POINTS = 2
"""Sizes the exponent is fitted on, the largest: there a step's work outweighs its start-up (a
worker pool, an import) most, so the slope is the growth that carries to larger sizes."""


def fit_exponent(sizes: Sequence[float], values: Sequence[float]) -> Optional[float]:
    """Slope of log(value) on log(size) over the largest `FIT_POINTS` sizes (None without two positive points)."""
    points = [(s, v) for s, v in zip(sizes, values) if v > 0][-FIT_POINTS:]
    if len(points) < 2:
        return None
    x = numpy.log([p[0] for p in points])
    y = numpy.log([p[1] for p in points])
    return float(numpy.polyfit(x, y, 1)[0])


def extrapolate(size: float, value: float, exponent: Optional[float], target: float) -> Optional[float]:
    if exponent is None or value <= 0:
        return None
    return value * (target / size) ** exponent


def marginal_bytes(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Bytes per unit between the two largest sizes: what each further unit costs (a fixed share,
    such as worker processes or a model, does not grow and drops out)."""
    if len(sizes) < 2 or sizes[-1] == sizes[-2]:
        return 0.0
    return max(values[-1] - values[-2], 0) / (sizes[-1] - sizes[-2])


def summarise(name: str, runs: List[dict]) -> dict:
    """Per step: the time exponent and time at the paper's size (power law through the two largest
    sizes); for memory and output the bytes each further unit adds and the linear extrapolation
    (largest value + bytes per unit x the units still to come), with the log-log exponent beside it."""
    step = STEPS[name]
    sizes = [run["size"] for run in runs]
    largest = runs[-1]
    summary = {"unit": step.unit, "paper_size": step.paper_size, "paper_what": step.paper_what}
    for key in ("seconds", "cpu_seconds"):
        values = [run.get(key, 0.0) for run in runs]
        exponent = fit_exponent(sizes, values)
        summary[key] = {"exponent": exponent, "at_paper_scale": extrapolate(
            largest["size"], values[-1], exponent, step.time_size or step.paper_size)}
    for key in ("peak_rss_delta", "peak_private_delta", "output_bytes"):
        values = [run.get(key, 0) for run in runs]
        per_unit = marginal_bytes(sizes, values)
        target = (step.time_size or step.paper_size) if key == "output_bytes" else step.paper_size  # output follows tokens
        summary[key] = {"exponent": fit_exponent(sizes, values), "bytes_per_unit": per_unit,
                        "at_paper_scale": values[-1] + per_unit * (target - sizes[-1])}
    return summary


NODE_CORES, NODE_MEMORY_GIB, HERE_CORES = 64, 256, 2
FLAT_BYTES = 4 << 20
"""A step whose peak memory grows less than this between its two largest sizes is counted as flat
(sampling noise, not growth)."""


def at_node(name: str, summary: dict, runs: List[dict]) -> dict:
    """The paper-scale figures of a step on one node (64 cores, 256 GiB), and its verdict."""
    step, largest = STEPS[name], runs[-1]
    timing = "cpu_seconds" if all("cpu_seconds" in run for run in runs) else "seconds"
    seconds = summary[timing]["at_paper_scale"]
    if seconds is not None and step.uses_cores:
        # CPU seconds spread over the node's cores; wall seconds here were spread over 2
        seconds /= NODE_CORES if timing == "cpu_seconds" else NODE_CORES / HERE_CORES
    resident = _memory_at_scale(runs, summary, "peak_rss_delta", "baseline_rss")
    # the copies a node runs share file-backed pages (a memory-mapped dataset): those count once
    private = (_memory_at_scale(runs, summary, "peak_private_delta", "baseline_private")
               if all("peak_private_delta" in run for run in runs) else resident)
    grew = largest["peak_rss_delta"] - runs[-2]["peak_rss_delta"]
    memory = private * step.node_copies + max(resident - private, 0)
    exponent = summary[timing]["exponent"]
    problems = []
    if memory > NODE_MEMORY_GIB * GIB:
        problems.append(f"memory {memory / GIB:,.0f} GiB > {NODE_MEMORY_GIB}")
    if exponent is not None and exponent > 1.2:
        problems.append(f"time grows as size^{exponent:.2f}")
    return {"seconds": seconds, "memory_bytes": memory, "memory_flat": grew < FLAT_BYTES,
            "verdict": "fits" if not problems else "DEFECT: " + "; ".join(problems)}


def _memory_at_scale(runs: List[dict], summary: dict, delta_key: str, baseline_key: str) -> float:
    """A process's bytes at the paper's size: its own before the step plus the step's growth,
    extrapolated (or as measured at the largest size when it grew less than FLAT_BYTES)."""
    largest = runs[-1]
    grew = largest[delta_key] - runs[-2][delta_key]
    delta = largest[delta_key] if grew < FLAT_BYTES else summary[delta_key]["at_paper_scale"]
    return largest[baseline_key] + delta


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("days", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.2f} s"


def format_report(results: dict) -> str:
    """The docs/SCALE.md table from scale.json."""
    lines = ["| step | grows with | sizes here | CPU-time exponent | memory per unit | at the paper's size | "
             "time on a 64-core node | memory on a node | output | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, stored in results["steps"].items():
        entry = {**stored, **summarise(name, stored["runs"])}  # fits of this code, from the raw runs
        runs, node = entry["runs"], at_node(name, entry, entry["runs"])
        timing = "cpu_seconds" if all("cpu_seconds" in run for run in runs) else "seconds"
        per_unit = entry["peak_rss_delta"]["bytes_per_unit"]
        memory_growth = "flat" if node["memory_flat"] else f"{per_unit:,.1f} B"
        output = entry["output_bytes"]["at_paper_scale"]
        copies = STEPS[name].node_copies
        lines.append(
            f"| {name} | {entry['unit']} | {runs[0]['size']:,} - {runs[-1]['size']:,} | "
            f"{entry[timing]['exponent']:.2f} | {memory_growth} | {entry['paper_what']} | "
            f"{_duration(node['seconds'])} | {node['memory_bytes'] / GIB:,.1f} GiB"
            f"{f' ({copies} ranks)' if copies > 1 else ''} | "
            f"{'-' if not output else f'{output / 1e9:,.0f} GB'} | {node['verdict']} |")
    return "\n".join(lines)


def plot(name: str, runs: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [run["size"] for run in runs]
    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    for key, label in (("seconds", "wall seconds"), ("cpu_seconds", "CPU seconds"),
                       ("peak_rss_delta", "peak RSS above start, GiB"), ("output_bytes", "output GiB")):
        scale = 1.0 if key.endswith("seconds") else GIB
        values = [run.get(key, 0) / scale for run in runs]
        if any(value > 0 for value in values):
            exponent = fit_exponent(sizes, [run.get(key, 0) for run in runs])
            axes.plot(sizes, values, marker="o", label=f"{label} (slope {exponent:.2f})" if exponent else label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(STEPS[name].unit)
    axes.set_title(name)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def machine() -> dict:
    import platform

    import psutil

    return {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
            "load_average": os.getloadavg(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_step(name: str, sizes: Sequence[int], out_dir: str, data_dir: str, timeout_s: float,
             quick: bool = False) -> List[dict]:
    runs = []
    # Threads that wait passively: on a shared machine spinning OpenMP threads burn (and count) CPU
    # time for nothing, and stretch wall time by several times
    environment = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "SCALE_QUICK": "1" if quick else "0"}
    for size in sizes:
        command = [sys.executable, "-m", "benchmarks.scale", "--child", name, str(size),
                   "--out-dir", out_dir, "--data-dir", data_dir]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=environment,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if done.returncode != 0:
            raise RuntimeError(f"{name} at {size}: exit {done.returncode}\n{done.stderr[-3000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["load_average_after"] = os.getloadavg()[0]
        print(f"{name:>24} {size:>10,} {STEPS[name].unit}: {run['seconds']:8.2f} s ({run['cpu_seconds']:8.2f} CPU s), "
              f"peak RSS +{run['peak_rss_delta'] / 2**20:8.1f} MiB, output {run.get('output_bytes', 0) / 2**20:8.1f} MiB",
              flush=True)
        runs.append(run)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/scale")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} for every step (the test)")
    parser.add_argument("--sizes-scale", type=int, default=1, help="multiply every step's sizes (default 1)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per (step, size) run")
    parser.add_argument("--data-dir", default=None, help="generated inputs (default --out-dir/data; share it "
                                                          "between out-dirs to measure a change on the same data)")
    parser.add_argument("--report", action="store_true", help="print the docs/SCALE.md table of --out-dir's scale.json")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        with open(os.path.join(args.out_dir, "scale.json"), encoding="utf-8") as handle:
            print(format_report(json.load(handle)))
        return 0
    data_dir = os.path.abspath(args.data_dir or os.path.join(args.out_dir, "data"))
    if args.child:
        print(json.dumps(run_child(args.child[0], int(args.child[1]), data_dir)))
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "scale.json")
    results = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {"steps": {}}
    results["machine_at_start"] = machine()
    for name in args.steps:
        sizes = QUICK_SIZES if args.quick else [size * args.sizes_scale for size in STEPS[name].sizes]
        try:
            runs = run_step(name, sizes, args.out_dir, data_dir, args.timeout_s, args.quick)
        except (RuntimeError, subprocess.TimeoutExpired) as error:  # one step's failure: the others still run
            print(f"{name}: not measured: {str(error).splitlines()[0]}", flush=True)
            results.setdefault("failed", {})[name] = str(error)[-2000:]
            continue
        results["steps"][name] = {"runs": runs, **summarise(name, runs)}
        plot(name, runs, os.path.join(args.out_dir, f"{name}.png"))
        with open(path, "w", encoding="utf-8") as handle:  # kept after every step
            json.dump(results, handle, indent=2)
    results["machine_at_end"] = machine()
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(format_report(results))
    print(f"wrote {path} and {len(args.steps)} plots in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
