# The README's two commands. Each creates .venv on first use and installs what it needs:
# torch 2.13.0 first (the CPU wheel on these machines; an unpinned torch pulls CUDA builds),
# then this package with its test extras.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.megatron_conan-installed

.PHONY: quickstart test install clean gpu-check gpu-bundle gpu-rehearsal cluster-test scale-bench

# The prepared GPU check (docs/GPU.md): one GPU, within BUDGET_S seconds. It uses the Python at hand
# (a GPU machine's own torch with CUDA), .venv's where one exists, and installs nothing: run as a module
# from the repository root, it needs no install (conan-gpu-check is the same command installed).
BUDGET_S ?= 510
GPU_CHECK_OUT ?= .
CHECK_PYTHON ?= $(if $(wildcard $(PYTHON)),$(PYTHON),python3)
# The offline wheels of what the check loads and a GPU node lacks (benchmarks/gpu_node_inventory.txt):
# made where there is a package index, used by gpu-check where a module is missing (docs/GPU.md).
GPU_BUNDLE ?= gpu-bundle
# The rehearsal's work directory (a venv of the node's packages, several GiB, and a fresh clone):
# outside the repository. REHEARSAL_PYTHON: an interpreter of the node's Python version (on a pyenv
# machine: PYENV_VERSION=3.12.1). REHEARSAL_SUITE=1 also runs the full test suite there (20+ min);
# REHEARSAL_NO_CUDA_BUILD=1 leaves out the CUDA extension's build (kept between rehearsals once made).
REHEARSAL_DIR ?= $(HOME)/.cache/megatron_conan/gpu-rehearsal
REHEARSAL_PYTHON ?= python3.12
REHEARSAL_BUDGET_S ?= 300

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
	$(PYTHON) -m pytest -q -p no:cacheprovider --timeout=900 --durations=40 -n $(TEST_WORKERS) --dist loadfile tests

install: $(STAMP)

# A real two-node SLURM cluster on this machine (tests/cluster/README.md): every sbatch file of
# examples/slurm run on it, time-limit requeue, preemption, a lost node, signals during start-up.
# Needs root; without it, one line saying why and exit 2 (before any install). CLUSTER_CHECKS="lost-node
# scancel" runs only those after the stage runs (names in tests/cluster/checks.py).
CLUSTER_CHECKS ?=
cluster-test:
	@bash tests/cluster/run.sh --check-only
	@$(MAKE) --no-print-directory $(STAMP)
	@bash tests/cluster/run.sh $(PYTHON) $(CLUSTER_CHECKS)

gpu-check:
	$(CHECK_PYTHON) -m megatron_conan.cli.gpu_check --budget-s $(BUDGET_S) --out-dir $(GPU_CHECK_OUT) --bundle $(GPU_BUNDLE)

gpu-bundle:
	$(CHECK_PYTHON) -m megatron_conan.cli.gpu_bundle --out $(GPU_BUNDLE)

gpu-rehearsal:
	$(CHECK_PYTHON) -m megatron_conan.cli.gpu_rehearsal --workdir $(REHEARSAL_DIR) --python $(REHEARSAL_PYTHON) --budget-s $(REHEARSAL_BUDGET_S) $(if $(REHEARSAL_SUITE),--suite) $(if $(REHEARSAL_NO_CUDA_BUILD),--no-cuda-build)

$(STAMP): setup.py pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	MEGATRON_CONAN_SKIP_CUDA_EXT=1 $(PYTHON) -m pip install --quiet -e '.[dev,ann]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
