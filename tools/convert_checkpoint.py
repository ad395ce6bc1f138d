"""`conan-convert` as a script: `python tools/convert_checkpoint.py ...` = `conan-convert ...` (megatron_conan/cli/convert.py)."""

import sys

from megatron_conan.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
