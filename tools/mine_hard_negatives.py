"""`conan-mine` as a script: `python tools/mine_hard_negatives.py ...` = `conan-mine ...` (megatron_conan/cli/mine.py)."""

import sys

from megatron_conan.cli.mine import main

if __name__ == "__main__":
    sys.exit(main())
