"""The GPU check's offline wheel bundle (docs/GPU.md; `make gpu-bundle`):

    python -m megatron_conan.cli.gpu_bundle [--out gpu-bundle] [--inventory benchmarks/gpu_node_inventory.txt]

Downloads, for the node's CPython on manylinux x86_64, binary wheels of what the check loads and the
node lacks (megatron_conan/gpu_node/bundle.py has the rule), prints each wheel and the total, and
fails in one line over 40 MiB. Needs a package index; the node needs none.
"""

import sys

from megatron_conan.console import command_parser, run_command
from megatron_conan.gpu_node import bundle
from megatron_conan.gpu_node.imports import check_imports
from megatron_conan.gpu_node.inventory import INVENTORY, project_requirements, read_inventory

PROG = "gpu-bundle"


def main(argv=None) -> int:
    return run_command(_main, argv, prog=PROG)


def _main(argv) -> int:
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--out", default="gpu-bundle", help="the bundle's directory (made or replaced by this tool only)")
    parser.add_argument("--inventory", default=INVENTORY, help="the node's declared software")
    parser.add_argument("--pip-python", default=sys.executable, help="the interpreter whose pip resolves and downloads")
    args = parser.parse_args(argv)
    inventory = read_inventory(args.inventory)
    install_requires, _ = project_requirements()
    manifest = bundle.build_bundle(args.out, inventory, install_requires, check_imports(), python=args.pip_python)
    print("\n".join(bundle.describe(manifest) + [f"wrote {args.out}/"]))  # user-facing
    return 0


if __name__ == "__main__":
    sys.exit(main())
