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



def _ours_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".")[0] == "megatron_conan"


def configure_cli_logging() -> None:
    """Our messages from INFO up, everyone else's from WARNING up, one format. A filter on the
    handler rather than logger levels: some libraries set their own logger to DEBUG when imported
    (bm25s says "Building index from IDs objects" on every index), after any level we could set."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if _ours_or_warning not in handler.filters:
            handler.addFilter(_ours_or_warning)
