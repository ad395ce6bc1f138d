"""Training-step throughput: tokens/s and MFU of the pretraining step (docs/GPU.md, part `train_step`).

On a GPU (default there): recipe conan_1p4b, sequence 4096, bf16, one process, for each micro-batch
size asked for, with and without activation recomputation. On CPU (default there): the tiny recipe
in fp32, so the script itself is exercised by the tests. Warm-up steps are excluded; model FLOPs
per token follow docs/GPU.md (6 N_non-embedding + 6 V h + 12 L h s), MFU is over 989 TFLOP/s.

    python benchmarks/train_step.py                       # CPU: tiny
    python benchmarks/train_step.py --recipe conan_1p4b --micro-batch-sizes 1 2 4 --recompute none full
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile


def _measure(recipe: str, seq_length: int, micro_batch: int, precision: str, recompute: str,
             steps: int, warmup: int, run_dir: str, num_layers: int = 0, transformer_engine: str = "auto") -> dict:
    import torch

    from megatron_conan.config.loader import from_dict
    from megatron_conan.config.run import LanguageModelConfig
    from megatron_conan.training.trainer import train

    cfg = from_dict(LanguageModelConfig, {
        "run_dir": run_dir,
        "model": {"recipe": recipe, "overrides": {"max_sequence_length": max(seq_length, 64),
                                                  **({"num_layers": num_layers} if num_layers else {})},
                  "transformer_engine": {"auto": None, "on": True, "off": False}[transformer_engine]},
        "optimizer": {"lr": 1e-4, "warmup_fraction": 0.0, "decay_style": "constant"},
        "train": {"train_steps": warmup + steps, "global_batch_size": micro_batch, "micro_batch_size": micro_batch,
                  "seq_length": seq_length, "precision": precision, "recompute": recompute,
                  "log_interval": 10_000},
        "checkpoint": {"save_interval": 0, "keep_last": 1, "save_dir": os.path.join(run_dir, "ckpt")},
        "data": {"kind": "synthetic"},
    })
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][warmup:]
    tokens_per_s = sum(r["tokens_per_s"] for r in records) / len(records)
    mfu = sum(r["mfu"] for r in records) / len(records)
    memory = (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else records[-1].get("memory/rss_gib")
    from megatron_conan.ops.engines import transformer_engine_available

    used = transformer_engine_available() if transformer_engine == "auto" else transformer_engine == "on"
    return {"recipe": recipe, "num_layers": num_layers or None, "transformer_engine": used,
            "seq_length": seq_length, "micro_batch": micro_batch, "precision": precision,
            "recompute": recompute, "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_memory_gib": memory}


def main(argv=None) -> int:
    import torch

    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="conan_1p4b" if on_gpu else "tiny")
    parser.add_argument("--seq-length", type=int, default=4096 if on_gpu else 64)
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2] if on_gpu else [2])
    parser.add_argument("--recompute", nargs="+", default=["none", "full"], choices=["none", "selective", "full"])
    parser.add_argument("--num-layers", type=int, default=0,
                        help="layers of the recipe's width to keep (0: the recipe's own; a few fit a quick check)")
    parser.add_argument("--precision", default="bf16" if on_gpu else "fp32")
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 3)
    parser.add_argument("--warmup", type=int, default=3 if on_gpu else 1)
    parser.add_argument("--transformer-engine", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                        help="layers: auto (TE where installed), on, off (megatron-core's local layers); "
                             "several values measure each")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    from megatron_conan.console import configure_logging

    configure_logging(logging.WARNING)

    from megatron_conan.distributed.parallel import destroy_parallel, init_process_group_from_env

    init_process_group_from_env()
    rows = []
    try:
        for micro_batch, recompute, engine in itertools.product(args.micro_batch_sizes, args.recompute,
                                                                args.transformer_engine):
            with tempfile.TemporaryDirectory() as run_dir:
                try:
                    rows.append(_measure(args.recipe, args.seq_length, micro_batch, args.precision, recompute,
                                         args.steps, args.warmup, run_dir, args.num_layers, engine))
                except torch.cuda.OutOfMemoryError:
                    rows.append({"micro_batch": micro_batch, "recompute": recompute, "error": "out of memory"})
                    if on_gpu:
                        torch.cuda.empty_cache()
    finally:
        destroy_parallel()
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"train step: {args.recipe}, seq {args.seq_length}, {args.precision}, {device}, torch {torch.__version__}")
    print(f"{'micro':>5} {'recompute':>9} {'TE':>3} {'tokens/s':>12} {'MFU':>8} {'peak GiB':>9}")
    baseline = next((r for r in rows if "error" not in r), None)
    for row in rows:
        if "error" in row:
            print(f"{row['micro_batch']:>5} {row['recompute']:>9}  {row['error']}")
            continue
        ratio = row["tokens_per_s"] / baseline["tokens_per_s"]
        memory = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        print(f"{row['micro_batch']:>5} {row['recompute']:>9} {'on' if row['transformer_engine'] else 'off':>3} "
              f"{row['tokens_per_s']:>12.1f} {row['mfu']:>8.2%} "
              f"{memory:>9}  x{ratio:.2f} vs first row")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
