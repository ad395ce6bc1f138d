"""The GPU check's rehearsal on CPU against the GPU node's exact packages (docs/GPU.md; `make gpu-rehearsal`):

    python -m megatron_conan.cli.gpu_rehearsal [--workdir DIR] [--python python3.12] [--suite]

Builds (once) a venv of the node's inventory from the package index, clones this checkout's HEAD,
builds the offline bundle there, checks that every module the check loads imports on the node's
packages plus the bundle, and runs `conan-gpu-check --cpu --budget-s 300` in the clone: every part
must run, or skip for lack of a GPU only. --suite also runs the full test suite there. Exit 1 when
any of that fails (megatron_conan/gpu_node/rehearsal.py).
"""

import sys

from megatron_conan.console import command_parser, run_command
from megatron_conan.gpu_node.rehearsal import Rehearsal, default_workdir

PROG = "gpu-rehearsal"


def main(argv=None) -> int:
    return run_command(_main, argv, prog=PROG)


def _main(argv) -> int:
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--workdir", default=default_workdir(), help="this tool's directory (outside the repository)")
    parser.add_argument("--python", default="python3.12", help="an interpreter of the node's Python version")
    parser.add_argument("--budget-s", type=float, default=300.0, help="the CPU check's budget")
    parser.add_argument("--suite", action="store_true", help="also run the full test suite on the node's packages")
    parser.add_argument("--no-cuda-build", action="store_true", help="leave out the CUDA extension's build")
    args = parser.parse_args(argv)
    return Rehearsal(workdir=args.workdir, python=args.python, budget_s=args.budget_s, suite=args.suite,
                     cuda_build=not args.no_cuda_build).run()


if __name__ == "__main__":
    sys.exit(main())
