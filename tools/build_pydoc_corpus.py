"""`conan-build-pydoc-corpus` as a script: `python tools/build_pydoc_corpus.py ...` = `conan-build-pydoc-corpus ...` (megatron_conan/cli/build_pydoc_corpus.py)."""

import sys

from megatron_conan.cli.build_pydoc_corpus import main

if __name__ == "__main__":
    sys.exit(main())
