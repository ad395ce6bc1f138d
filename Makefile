# The README's two commands. Each creates .venv on first use and installs what it needs:
# torch 2.13.0 first (the CPU wheel on these machines; an unpinned torch pulls CUDA builds),
# then this package with its test extras.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.megatron_conan-installed

.PHONY: quickstart test install clean

quickstart: $(STAMP)
	$(PYTHON) -m megatron_conan.quickstart

test: $(STAMP)
	$(PYTHON) -m pytest -q -p no:cacheprovider --timeout=900 tests

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	MEGATRON_CONAN_SKIP_CUDA_EXT=1 $(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
