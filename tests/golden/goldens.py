"""Golden per-step losses of the four stages (tiny recipes, seed 0), and the script that records and
checks them.

    python -m tests.golden.goldens --check            # run every stage, compare with the goldens
    python -m tests.golden.goldens --write            # record them anew (only on purpose: README.md)
    python -m tests.golden.goldens --check embed-sup  # one stage

Each stage runs as a user runs it: its entry point (``python -m megatron_conan.training.<stage>``,
under ``torchrun --standalone`` for more than one rank) with ``examples/tiny/<stage>.yaml``, a few
steps, ``train.seed=0`` and no starting checkpoint, on data built here from the repository's
synthetic generators (the same recipe as the embedding tests' session fixtures, which call
:func:`build_tokenizer`, :func:`build_pairs` and :func:`build_supervised`). The losses are read
back from the run's ``metrics.jsonl``: float32 losses written as Python floats, so "bit-identical"
means equal floats. Only entry points, the synthetic generators and the tokenizer trainer are used,
so the script runs against any commit that has them.

A golden file (``<run>.json`` beside this file) holds, per step, every metric whose name starts
with ``loss`` (the loss, the per-task and per-Matryoshka-dim losses), and for stage 4 the task and
the DHNM replacements; plus the tolerance the run is held to (0: bit-identical). README.md beside
this file says when and how they were recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY_VOCAB = 512
# DHNM thresholds that act on a briefly trained tiny model (a first score below 0.95 is "easy")
ACTIVE_DHNM = "embedding.dhnm={enabled: true, min_first_score: 0.95, drop_ratio: 1.2, max_score: 0.7}"


@dataclass(frozen=True)
class GoldenRun:
    """One recorded run: a stage's tiny recipe with `overrides`, on `ranks` processes."""

    name: str
    stage: str
    overrides: Tuple[str, ...]
    ranks: int = 1
    tolerance: float = 0.0
    """Largest |fresh - golden| / max(1, |golden|) accepted per loss (0: bit-identical)."""
    data: Tuple[str, ...] = ()
    """Overrides naming the data: templates over the paths of :func:`build_data`."""


# cumulative draw probabilities 0.2 / 0.4 / 0.64 / 1 put the draws of seed 0 (0.059, 0.092, 0.634,
# 0.392, 0.077, 0.025, 0.018, 0.645, ...) on every task within 8 steps: r r cls clr r r r sts
ALL_TASKS = "embedding.task_weights={retrieval: 20, clr: 20, classification: 24, sts: 36}"
PAIRS = ("data.tokenizer={tokenizer}", "data.contrastive_prefix={pairs}")
SUPERVISED = ("data.tokenizer={tokenizer}", "data.contrastive_prefix={supervised}")
RUNS: Tuple[GoldenRun, ...] = (
    GoldenRun("pretrain", "pretrain", ("train.train_steps=6",)),
    GoldenRun("sft", "sft", ("train.train_steps=4",), data=("data.tokenizer={tokenizer}", "data.sft_prefix={sft}")),
    GoldenRun("embed_weak", "embed-weak", ("train.train_steps=6",), data=PAIRS),
    GoldenRun("embed_sup", "embed-sup", ("train.train_steps=8", ACTIVE_DHNM, ALL_TASKS), data=SUPERVISED),
    # GradCache (by count, and by tokens in stage 3), the symmetric loss and two data-parallel ranks:
    # the gather of the candidates and its backward run for real
    GoldenRun("embed_weak_dp2_gradcache", "embed-weak",
              ("train.train_steps=4", "embedding.mini_batch_size=2", "embedding.mini_batch_tokens=40",
               "embedding.symmetric=true", "embedding.matryoshka_dims=[16, 32]"), ranks=2, data=PAIRS),
    GoldenRun("embed_sup_dp2_gradcache", "embed-sup",
              ("train.train_steps=8", ACTIVE_DHNM, ALL_TASKS, "embedding.mini_batch_size=3",
               "embedding.task_batch_sizes={retrieval: 2, clr: 2, classification: 2, sts: 4}"), ranks=2,
              data=SUPERVISED),
)
COMMON = ("train.seed=0", "checkpoint.load_dir=null", "checkpoint.save_interval=0", "train.eval_interval=0")


# -- data ---------------------------------------------------------------------------------------

def build_tokenizer(directory) -> str:
    """A 512-piece SentencePiece model (the tiny vocabulary) trained on synthetic multilingual text;
    returns the ``.model`` path. ``directory/text.jsonl`` stays (tests train other tokenizers on it)."""
    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer
    from megatron_conan.datagen import synthetic

    directory = str(directory)
    synthetic.write_pretraining_jsonl(os.path.join(directory, "text.jsonl"), num_docs=300, seed=3)
    train_tokenizer([os.path.join(directory, "text.jsonl")], os.path.join(directory, "tokenizer"),
                    TokenizerTrainingConfig(vocab_size=TINY_VOCAB, num_threads=1, character_coverage=0.98))
    return os.path.join(directory, "tokenizer.model")


def _tool(module: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", module, *args, "--no-progress"], check=True, capture_output=True,
                   cwd=REPO)


def build_pairs(directory, tokenizer: str) -> str:
    """A store of 96 stage-3 `pair` examples; returns its prefix."""
    from megatron_conan.datagen import synthetic

    prefix = os.path.join(str(directory), "pairs")
    synthetic.write_contrastive_jsonl(prefix + ".jsonl", examples_per_task=96, tasks=("pair",), seed=4)
    _tool("megatron_conan.cli.tokenize_contrastive", "--input", prefix + ".jsonl", "--output-prefix", prefix,
          "--tokenizer-model", tokenizer)
    return prefix


def build_supervised(directory, tokenizer: str) -> str:
    """A store of 48 examples of each stage-4 task (retrieval and clr with negatives and candidate
    pools, classification, sts); returns its prefix."""
    from megatron_conan.datagen import synthetic

    prefix = os.path.join(str(directory), "supervised")
    synthetic.write_contrastive_jsonl(prefix + ".jsonl", examples_per_task=48,
                                      tasks=("retrieval", "clr", "classification", "sts"), seed=6)
    _tool("megatron_conan.cli.tokenize_contrastive", "--input", prefix + ".jsonl", "--output-prefix", prefix,
          "--tokenizer-model", tokenizer)
    return prefix


def build_sft(directory, tokenizer: str) -> str:
    """An indexed SFT dataset of 40 synthetic instruction examples; returns its prefix."""
    from megatron_conan.datagen import synthetic

    prefix = os.path.join(str(directory), "sft")
    synthetic.write_sft_jsonl(prefix + ".jsonl", num_examples=40)
    _tool("megatron_conan.cli.preprocess", "--format", "sft", "--input", prefix + ".jsonl", "--output-prefix",
          prefix, "--tokenizer-model", tokenizer)
    return prefix


def build_data(directory) -> Dict[str, str]:
    """Every run's data under `directory`: {tokenizer, sft, pairs, supervised} paths."""
    tokenizer = build_tokenizer(directory)
    return {"tokenizer": tokenizer, "sft": build_sft(directory, tokenizer),
            "pairs": build_pairs(directory, tokenizer), "supervised": build_supervised(directory, tokenizer)}


# -- runs ---------------------------------------------------------------------------------------

def command(run: GoldenRun, data: Dict[str, str], run_dir: str) -> List[str]:
    """The command line of `run` (a stage entry point, under torchrun for several ranks)."""
    module = "megatron_conan.training." + run.stage.replace("-", "_")
    launcher = [sys.executable, "-m", module]
    if run.ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.ranks}",
                    "-m", module]
    return [*launcher, *arguments(run, data, run_dir)]


def arguments(run: GoldenRun, data: Dict[str, str], run_dir: str) -> List[str]:
    """The stage's arguments: the tiny recipe and the run's overrides."""
    recipe = os.path.join(REPO, "examples", "tiny", run.stage.replace("-", "_") + ".yaml")
    return ["--config", recipe, f"run_dir={run_dir}", *COMMON, *run.overrides,
            *(item.format(**data) for item in run.data)]


def start(run: GoldenRun, data: Dict[str, str], run_dir: str) -> subprocess.Popen:
    """Start `run` in its own session (the caller waits, or kills the group)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(command(run, data, run_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def read_record(run: GoldenRun, run_dir: str) -> Dict[str, Dict[str, object]]:
    """{step: {loss..., task, dhnm_replacements}} of a finished run's metrics.jsonl."""
    steps: Dict[str, Dict[str, object]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            kept = {name: value for name, value in record.items()
                    if name.startswith("loss") or name in ("task", "dhnm_replacements")}
            steps[str(record["step"])] = dict(sorted(kept.items()))
    return steps


def run_and_read(run: GoldenRun, data: Dict[str, str], run_dir: str, timeout: float = 600) -> Dict:
    process = start(run, data, run_dir)
    try:
        output, _ = process.communicate(timeout=timeout)
    except BaseException:
        os.killpg(process.pid, 9)
        process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{run.name} failed ({process.returncode}):\n{output[-4000:]}")
    return read_record(run, run_dir)


def run_in_world(rank: int, world_size: int, runs: Sequence[GoldenRun], data: Dict[str, str],
                 directory: str) -> Dict[str, Dict]:
    """Body of a spawned world (``run_distributed``) that trains `runs` one after another, each as
    its entry point would (the same config parsing and ``train``), without paying a process start
    and megatron-core's import per run; returns {run name: its steps}."""
    from megatron_conan.training.stage_main import parse_run_config
    from megatron_conan.training.trainer import train

    results = {}
    for run in runs:
        run_dir = os.path.join(directory, run.name)
        _, cfg = parse_run_config(run.stage, arguments(run, data, run_dir))
        train(cfg, stage=run.stage)
        results[run.name] = read_record(run, run_dir)
    return results


def golden_path(run: GoldenRun) -> str:
    return os.path.join(HERE, f"{run.name}.json")


def load_golden(run: GoldenRun) -> Dict:
    with open(golden_path(run), encoding="utf-8") as handle:
        return json.load(handle)


def differences(run: GoldenRun, fresh: Dict, golden: Dict) -> List[str]:
    """What differs between a fresh run's steps and the golden's, one line each (empty: they match)."""
    expected = golden["steps"]
    problems = [] if sorted(fresh) == sorted(expected) else [f"steps {sorted(fresh)} != {sorted(expected)}"]
    for step in sorted(set(fresh) & set(expected), key=int):
        mine, theirs = fresh[step], expected[step]
        if set(mine) != set(theirs):
            problems.append(f"step {step}: metrics {sorted(mine)} != {sorted(theirs)}")
        for name in sorted(set(mine) & set(theirs)):
            a, b = mine[name], theirs[name]
            if isinstance(b, float) and isinstance(a, (int, float)):
                if abs(a - b) > golden["tolerance"] * max(1.0, abs(b)):
                    problems.append(f"step {step} {name}: {a!r} != golden {b!r} (diff {a - b:.3g})")
            elif a != b:
                problems.append(f"step {step} {name}: {a!r} != golden {b!r}")
    return problems


def write_golden(run: GoldenRun, fresh: Dict) -> None:
    payload = {"run": run.name, "stage": run.stage, "ranks": run.ranks, "tolerance": run.tolerance,
               "command": " ".join(["conan-" + run.stage, *COMMON, *run.overrides, *run.data]),
               "steps": fresh}
    with open(golden_path(run), "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden.goldens", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="compare fresh runs with the goldens")
    action.add_argument("--write", action="store_true", help="record the goldens anew")
    parser.add_argument("runs", nargs="*", help=f"runs (default all): {', '.join(run.name for run in RUNS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.runs) - {run.name for run in RUNS})
    if unknown:
        parser.error(f"unknown runs {unknown}")
    selected = [run for run in RUNS if not args.runs or run.name in args.runs]
    directory = tempfile.mkdtemp(prefix="conan-goldens-")
    failed = 0
    try:
        data = build_data(directory)
        for run in selected:
            fresh = run_and_read(run, data, os.path.join(directory, run.name))
            if args.write:
                write_golden(run, fresh)
                print(f"{run.name}: wrote {golden_path(run)}")
                continue
            problems = differences(run, fresh, load_golden(run))
            failed += bool(problems)
            print(f"{run.name}: " + ("matches" if not problems else "DIFFERS\n  " + "\n  ".join(problems)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
