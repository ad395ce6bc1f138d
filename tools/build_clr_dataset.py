"""`conan-build-clr` as a script: `python tools/build_clr_dataset.py ...` = `conan-build-clr ...` (megatron_conan/cli/build_clr.py)."""

import sys

from megatron_conan.cli.build_clr import main

if __name__ == "__main__":
    sys.exit(main())
