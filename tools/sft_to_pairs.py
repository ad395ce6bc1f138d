"""`conan-sft-to-pairs` as a script: `python tools/sft_to_pairs.py ...` = `conan-sft-to-pairs ...` (megatron_conan/cli/sft_to_pairs.py)."""

import sys

from megatron_conan.cli.sft_to_pairs import main

if __name__ == "__main__":
    sys.exit(main())
