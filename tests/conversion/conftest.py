"""Shared fixtures of the conversion tests: no network (the offline switches of huggingface_hub,
transformers and datasets are set before those packages load), and one set of tiny checkpoints and
exports built once per test session (megatron_conan.testing.fixtures)."""

import os

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    from megatron_conan.testing.fixtures import build_conversion_artifacts

    return build_conversion_artifacts(tmp_path_factory.getbasetemp() / "conan_conversion")
