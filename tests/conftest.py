"""Suite-wide test set-up: GPU tests are skipped without CUDA (checked lazily, not at import)."""

import warnings

import pytest

# megatron-core warns at import that Apex/TE are absent: expected on CPU, noise in test output.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


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
