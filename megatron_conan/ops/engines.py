"""Which optional kernel libraries this machine can import.

It sits in ``ops/``, below ``config/``, so that a config that asks for Transformer Engine can be
refused when it loads (``config/run.py``) and the model builder (``models/conan.py``) can pick its
layers, from the one probe (docs/DESIGN.md section 13)."""

from __future__ import annotations


def transformer_engine_available() -> bool:
    """Whether Transformer Engine (and megatron-core's wrappers of it) can be imported."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except Exception:  # TE raises more than ImportError when CUDA is missing
        return False
    return True
