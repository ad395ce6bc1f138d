"""The one prepared GPU check: every stage on one GPU, the soft-mask kernels' correctness and speed,
pretraining and stage-3 throughput, in order within a time budget (docs/GPU.md).

    python tools/gpu_check.py [--budget-s 480] [--out-dir .]          # on one GPU (make gpu-check)
    python tools/gpu_check.py --cpu --budget-s 300                     # the same script at tiny shapes

Writes gpu_check.json and gpu_check.md (a table for docs/PERFORMANCE.md) to --out-dir.
"""

import argparse
import os
import sys
import time

STARTED = time.monotonic()  # the budget counts this script's own start-up

if __package__ in (None, ""):  # run as `python tools/gpu_check.py`: the parts live in benchmarks/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megatron_conan.errors import run_main

    return run_main(_main, argv, prog="gpu_check.py")


def _main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole check")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU at tiny shapes (no GPU needed)")
    parser.add_argument("--out-dir", default=".", help="where gpu_check.json and gpu_check.md go")
    args = parser.parse_args(argv)
    from megatron_conan.errors import InputError

    if args.budget_s <= 0:
        raise InputError(f"--budget-s must be positive, got {args.budget_s:g}")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise InputError("no CUDA device is visible: run on a GPU machine, or pass --cpu for the tiny CPU check")
    from benchmarks.gpu_check import run_check

    report = run_check(args.budget_s, args.cpu, args.out_dir, started=STARTED)
    print(f"wrote {os.path.join(args.out_dir, 'gpu_check.json')} and gpu_check.md in "  # user-facing
          f"{report['wall_s']:.0f} s of a {args.budget_s:.0f} s budget")
    return 1 if any(part["status"] == "failed" for part in report["parts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
