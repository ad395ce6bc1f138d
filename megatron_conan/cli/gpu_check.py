"""conan-gpu-check: the one prepared GPU check: every stage on one GPU, the soft-mask kernels'
correctness and speed, pretraining and stage-3 throughput, in order within a time budget
(docs/GPU.md).

    conan-gpu-check [--budget-s 510] [--out-dir .]          # on one GPU (make gpu-check)
    conan-gpu-check --cpu --budget-s 300                     # the same check at tiny shapes

Where a module it loads is missing, it installs the offline wheels of `make gpu-bundle` (--bundle)
into a temporary directory for its parts, never system-wide, and never downloads.

Writes gpu_check.json and gpu_check.md (a table for docs/PERFORMANCE.md) to --out-dir. The parts
are the benchmarks of the source checkout the package runs from (benchmarks/gpu_check.py): an
editable install, or `python -m megatron_conan.cli.gpu_check` at the repository root.
"""

import argparse
import importlib.util
import os
import sys
import time

from megatron_conan.console import command_parser, run_command
from megatron_conan.errors import InputError

STARTED = time.monotonic()  # the budget counts the command's own start-up
PROG = "conan-gpu-check"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--budget-s", type=float, default=510.0, help="wall-clock budget of the whole check")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU at tiny shapes (no GPU needed)")
    parser.add_argument("--out-dir", default=".", help="where gpu_check.json and gpu_check.md go")
    parser.add_argument("--bundle", default=os.path.join(CHECKOUT, "gpu-bundle"),
                        help="the offline wheels of make gpu-bundle, installed where a module is missing")
    return parser.parse_args(argv)


def load_check():
    """benchmarks/gpu_check.py of the checkout, loaded by path: benchmarks/ is not an installed package
    (it runs each part as `python -m benchmarks.gpu_check_parts` with the checkout as working directory)."""
    path = os.path.join(CHECKOUT, "benchmarks", "gpu_check.py")
    if not os.path.isfile(path):
        raise InputError(f"no {path}: the GPU check runs a source checkout's benchmarks "
                         "(install the package with pip install -e from the repository)")
    spec = importlib.util.spec_from_file_location("benchmarks.gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    return run_command(_main, argv, prog=PROG)


def _main(argv) -> int:
    args = parse_args(argv)
    if args.budget_s <= 0:
        raise InputError(f"--budget-s must be positive, got {args.budget_s:g}")
    import torch  # here, after STARTED: its import counts against the budget

    if not args.cpu and not torch.cuda.is_available():
        raise InputError("no CUDA device is visible: run on a GPU machine, or pass --cpu for the tiny CPU check")
    report = load_check().run_check(args.budget_s, args.cpu, args.out_dir, started=STARTED, bundle_dir=args.bundle)
    print(f"wrote {os.path.join(args.out_dir, 'gpu_check.json')} and gpu_check.md in "  # user-facing
          f"{report['wall_s']:.0f} s of a {args.budget_s:.0f} s budget")
    return 1 if any(part["status"] == "failed" for part in report["parts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
