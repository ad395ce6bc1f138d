"""Suite-wide test set-up: GPU tests are skipped without CUDA (checked lazily, not at import)."""

import pytest

from megatron_conan.warning_filters import silence_known_warnings

silence_known_warnings()  # megatron-core's CPU fallbacks and deprecations: noise in test output


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)
