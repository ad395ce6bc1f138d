# The README's two commands. Each creates .venv on first use and installs what it needs:
# torch 2.13.0 first (the CPU wheel on these machines; an unpinned torch pulls CUDA builds),
# then this package with its test extras.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.megatron_conan-installed

.PHONY: quickstart test install clean gpu-check scale-bench

# The prepared GPU check (docs/GPU.md): one GPU, within BUDGET_S seconds. It uses the Python at hand
# (a GPU machine's own torch with CUDA), .venv's where one exists, and installs nothing: run as a module
# from the repository root, it needs no install (conan-gpu-check is the same command installed).
BUDGET_S ?= 480
GPU_CHECK_OUT ?= .
CHECK_PYTHON ?= $(if $(wildcard $(PYTHON)),$(PYTHON),python3)

# The suite runs on TEST_WORKERS pytest-xdist processes, a test file to a process (--dist loadfile:
# module fixtures are built once). Most tests leave a core idle (imports, Python, single-threaded
# ranks): on 2 cores two workers took 855 s against 1300 s in one, every test passing in both.
# TEST_WORKERS=0: in this process, without xdist.
TEST_WORKERS ?= 2

quickstart: $(STAMP)
	$(PYTHON) -m megatron_conan.quickstart

# How each data and tooling step's cost grows with its size, carried to the paper's scale
# (docs/SCALE.md): minutes, not part of `make test`. SCALE_OUT keeps its JSON and plots.
SCALE_OUT ?= runs/scale
scale-bench: $(STAMP)
	$(PYTHON) -m benchmarks.scale --out-dir $(SCALE_OUT)

test: $(STAMP)
	$(PYTHON) -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

install: $(STAMP)

gpu-check:
	$(CHECK_PYTHON) -m megatron_conan.cli.gpu_check --budget-s $(BUDGET_S) --out-dir $(GPU_CHECK_OUT)

$(STAMP): setup.py pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	MEGATRON_CONAN_SKIP_CUDA_EXT=1 $(PYTHON) -m pip install --quiet -e '.[dev,ann]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
