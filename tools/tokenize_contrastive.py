"""`conan-tokenize-contrastive` as a script: `python tools/tokenize_contrastive.py ...` = `conan-tokenize-contrastive ...` (megatron_conan/cli/tokenize_contrastive.py)."""

import sys

from megatron_conan.cli.tokenize_contrastive import main

if __name__ == "__main__":
    sys.exit(main())
