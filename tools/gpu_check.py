"""`conan-gpu-check` as a script: `python tools/gpu_check.py ...` = `conan-gpu-check ...` (megatron_conan/cli/gpu_check.py)."""

import sys

from megatron_conan.cli.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
