"""`conan-train-tokenizer` as a script: `python tools/train_tokenizer.py ...` = `conan-train-tokenizer ...` (megatron_conan/cli/train_tokenizer.py)."""

import sys

from megatron_conan.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
