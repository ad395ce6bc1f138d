"""`conan-preprocess` as a script: `python tools/preprocess_data.py ...` = `conan-preprocess ...` (megatron_conan/cli/preprocess.py)."""

import sys

from megatron_conan.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
