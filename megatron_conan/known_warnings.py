"""Third-party warnings known to be harmless here, silenced at one place so that what remains on the
console is worth reading. Each filter says why it is safe; anything not listed still shows.

Entry points, tools and spawned ranks call :func:`silence_known_warnings` first; the evaluation
command lines configure their logging with :func:`configure_cli_logging`.
"""

from __future__ import annotations

import logging
import warnings

KNOWN_WARNINGS = (
    # megatron-core falls back to its local layers, torch optimizers and torch norms when
    # Transformer Engine / Apex are absent (always on CPU; optional on GPUs, README says so)
    (UserWarning, r".*(Apex|Transformer Engine|Megatron-FSDP).*"),
    # megatron-core 0.16's own TransformerConfig default still sets the deprecated cuda_graph_scope
    # "full"; we use no CUDA graphs
    (UserWarning, r".*full scope is deprecated.*"),
    # megatron-core decorates fused kernels with torch.jit.script_method at import; we do not call it
    (DeprecationWarning, r".*torch\.jit\.script_method.*"),
    (DeprecationWarning, r".*dynamic_context\.py.*"),  # megatron-core inference imports, unused here
    # megatron-core 0.16's dist_checkpointing saves and loads through torch's ShardedTensor path and
    # its deprecated load_state_dict; checkpoints stay readable, the replacement is megatron's to make
    (FutureWarning, r".*Please use DTensor instead and we are deprecating ShardedTensor.*"),
    (FutureWarning, r".*`load_state_dict` is deprecated and will be removed.*"),
    # megatron-core's tensor-parallel layers advise a CUDA setting even on CPU runs
    (UserWarning, r".*CUDA_DEVICE_MAX_CONNECTIONS.*"),
)


def silence_known_warnings() -> None:
    """Install the filters of `KNOWN_WARNINGS` (idempotent)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)



class _OursOrWarnings(logging.Filter):
    """Passes every WARNING and above, and our own records from `our_level` up."""

    def __init__(self, our_level: int):
        super().__init__()
        self.our_level = our_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.name.split(".")[0] == "megatron_conan" and record.levelno >= self.our_level


def configure_cli_logging(our_level: int = logging.INFO, fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Our messages from `our_level` up, everyone else's from WARNING up, in one format. A filter on
    the handler rather than logger levels: some libraries set their own logger to DEBUG when
    imported (bm25s says "Building index from IDs objects" on every index), after any level we
    could set."""
    logging.basicConfig(level=min(our_level, logging.WARNING), format=fmt)
    for handler in logging.getLogger().handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, _OursOrWarnings)]
        handler.addFilter(_OursOrWarnings(our_level))
