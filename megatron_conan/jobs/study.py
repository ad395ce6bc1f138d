"""What the studies in benchmarks/ share: they re-train parts of a finished main job over its data
(learning_vs_st.py, ablations.py, quality_vs_compute.py, stage3_variants.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List

from megatron_conan.jobs.pipeline import Pipeline
from megatron_conan.jobs.plan import PLANS, Plan
from megatron_conan.jobs.workspace import set_up_console

MINED = ("retrieval_mined.jsonl", "supervised.")
"""Names of the main job's mining outputs (corpus/retrieval_mined.jsonl*, indexed/supervised.*)."""


def add_study_arguments(parser: argparse.ArgumentParser, output_name: str) -> None:
    """Options of a study that re-trains parts of a finished main job (benchmarks/learning_vs_st.py,
    benchmarks/ablations.py)."""
    parser.add_argument("--work-dir", default="runs/quickstart", help="a finished main job (make quickstart)")
    parser.add_argument("--output-dir", default=None, help=f"default: <work-dir>/{output_name}")
    parser.add_argument("--plan", choices=sorted(PLANS), default="full", help="the plan the work dir was made with")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])


def start_study(args, output_name: str, prog: str) -> bool:
    """Offline switches and logging for a study; False (after one line on stderr) when
    ``args.work_dir`` is not a finished main job."""
    set_up_console(logging.INFO)
    args.output_dir = args.output_dir or os.path.join(args.work_dir, output_name)
    if not os.path.isfile(os.path.join(args.work_dir, "sft", "checkpoints", "latest")):
        print(f"{prog}: {args.work_dir} is not a finished main job (no sft/checkpoints/latest): run make "
              "quickstart first", file=sys.stderr)  # user-facing: one line, then exit 2
        return False
    return True


def mean_std(values: List[float]) -> str:
    """``mean +- sample std`` (std 0 for one value), 4 decimals."""
    import statistics

    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {spread:.4f}"


def _link_entries(source: str, target: str) -> None:
    """`target`/ as a real directory whose entries link to `source`'s: what a variant writes there
    (mined negatives, its supervised store) stays its own."""
    os.makedirs(target, exist_ok=True)
    for entry in os.listdir(source):
        if entry.startswith(MINED):
            continue  # what mining makes: each variant (or the default it re-uses) has its own
        if not os.path.lexists(os.path.join(target, entry)):
            os.symlink(os.path.join(source, entry), os.path.join(target, entry))


def study_pipeline(work_dir: str, directory: str, plan: Plan, seed: int,
                   overrides: Dict[str, Dict[str, Any]]) -> Pipeline:
    """A Pipeline over `directory` sharing the finished main job's (`work_dir`) data and SFT checkpoint."""
    work = os.path.abspath(work_dir)
    for shared in ("corpus", "indexed"):
        _link_entries(os.path.join(work, shared), os.path.join(directory, shared))
    for shared in ("tokenizer", "sft"):
        if not os.path.lexists(os.path.join(directory, shared)):
            os.symlink(os.path.join(work, shared), os.path.join(directory, shared))
    pipeline = Pipeline(directory, plan, seed, overrides)
    with open(os.path.join(work, "corpus", "manifest.json"), encoding="utf-8") as handle:
        pipeline.manifest = json.load(handle)
    pipeline.use_tokenizer(os.path.join(work, "tokenizer", "pydoc.model"))
    return pipeline
