"""Stage-4 throughput with dynamic hard-negative mining on and off (issue: overhead under 2%).

One embed-sup trainer (tiny shape on CPU) on a synthetic retrieval store with hard-negative pools;
rounds alternate DHNM on (the step exchanges every global batch's slots with the DHNM state, picks
with it and observes every step's scores) and off (the first K of each pool, no state), so machine load hits
both alike. Reported: samples/s of each and the per-round overhead, 1 - on / off (median), and
DHNM's activity over the steps it was on (replacements, exhausted events, valid slots scored), so a
run with forced thresholds shows that the timed DHNM really decided (`--min-first-score 2`: every
slot is replaced at first use; `--min-first-score -2 --max-score -2`: none ever is).

    python benchmarks/dhnm_overhead.py [--steps 10 --rounds 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _store(directory: str, examples: int) -> dict:
    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer
    from megatron_conan.datagen import synthetic

    synthetic.write_pretraining_jsonl(os.path.join(directory, "text.jsonl"), num_docs=300, seed=3)
    train_tokenizer([os.path.join(directory, "text.jsonl")], os.path.join(directory, "tokenizer"),
                    TokenizerTrainingConfig(vocab_size=512, num_threads=1, character_coverage=0.98))
    synthetic.write_contrastive_jsonl(os.path.join(directory, "retrieval.jsonl"), examples_per_task=examples,
                                      tasks=("retrieval",), seed=7)
    tokenizer = os.path.join(directory, "tokenizer.model")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 "tools", "tokenize_contrastive.py"),
                    "--input", os.path.join(directory, "retrieval.jsonl"), "--output-prefix",
                    os.path.join(directory, "retrieval"), "--tokenizer-model", tokenizer, "--no-progress"],
                   check=True, capture_output=True)
    return {"tokenizer": tokenizer, "prefix": os.path.join(directory, "retrieval")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="retrieval queries per step")
    parser.add_argument("--num-negatives", type=int, default=3)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--min-first-score", type=float, default=None, help="eq. 6 threshold (default: the config's)")
    parser.add_argument("--max-score", type=float, default=None, help="eq. 6 threshold (default: the config's)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    from megatron_conan.console import configure_logging

    configure_logging(logging.WARNING)  # the figures only

    import torch

    from megatron_conan.config.loader import from_dict
    from megatron_conan.distributed.parallel import destroy_parallel, init_process_group_from_env
    from megatron_conan.config.run import EmbeddingConfig
    from megatron_conan.training.embedding_stage import SupervisedStage
    from megatron_conan.training.trainer import Trainer
    from megatron_conan.training.megatron_step import optimizer_step, zero_grads

    init_process_group_from_env()
    rates = {"on": [], "off": []}
    activity = {"replacements": 0, "exhausted_now": 0, "scored_slots": 0}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            data = _store(scratch, args.examples)
            cfg = from_dict(EmbeddingConfig, {
                "run_dir": os.path.join(scratch, "run"), "model": {"recipe": "tiny"},
                "train": {"train_steps": 10_000, "global_batch_size": args.batch, "eval_interval": 0},
                "data": {"kind": "contrastive", "tokenizer": data["tokenizer"], "contrastive_prefix": data["prefix"]},
                "embedding": {"num_negatives": args.num_negatives, "max_query_length": 64,
                              "max_passage_length": 64, "matryoshka_dims": [16, 32, 64],
                              "dhnm": {name: value for name, value in (("min_first_score", args.min_first_score),
                                                                       ("max_score", args.max_score))
                                       if value is not None}}})
            stage = SupervisedStage()
            trainer = Trainer(cfg, stage)
            ctx, dhnm = trainer.ctx, stage.dhnm
            step = 0

            def run(steps: int) -> float:
                nonlocal step
                started = time.perf_counter()
                for _ in range(steps):
                    zero_grads(ctx.chunks, trainer.optimizer)
                    metrics = stage.train_step(ctx, step, next(trainer.loader)).metrics
                    optimizer_step(trainer.optimizer)
                    for name in activity:
                        activity[name] += int(metrics.get(f"dhnm_{name}", 0))
                    step += 1
                return steps * args.batch / (time.perf_counter() - started)

            def use_dhnm(on: bool) -> None:
                stage.dhnm = dhnm if on else None  # off: the loader's first K of each pool

            run(3)  # warm-up
            for _ in range(args.rounds):
                for mode in ("on", "off"):
                    use_dhnm(mode == "on")
                    rates[mode].append(run(args.steps))
            trainer.loader.close()  # the read-ahead thread
    finally:
        destroy_parallel()
    overheads = [1.0 - on / off for on, off in zip(rates["on"], rates["off"])]
    row = {"samples_per_s_on": statistics.median(rates["on"]), "samples_per_s_off": statistics.median(rates["off"]),
           "overhead_median": statistics.median(overheads), "overheads": overheads, "dhnm": activity}
    print(f"embed-sup retrieval steps, tiny, batch {args.batch}, K={args.num_negatives}, CPU "  # user-facing
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"DHNM on  {row['samples_per_s_on']:8.1f} samples/s")
    print(f"DHNM off {row['samples_per_s_off']:8.1f} samples/s")
    print(f"overhead {row['overhead_median']:+.2%} (median of rounds: "
          + " ".join(f"{value:+.1%}" for value in overheads) + ")")
    print(f"DHNM     {activity['replacements']} replacements, {activity['exhausted_now']} exhausted, "  # user-facing
          f"{activity['scored_slots']} slots scored")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(row, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
