"""Third-party warnings known to be harmless here, silenced at one place so that what remains on the
console is worth reading. Each filter says why it is safe; anything not listed still shows.

Entry points and tools (through `errors.run_main`) and spawned ranks call
:func:`silence_known_warnings` first; their logging is set up by `console.configure_logging`.
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


# Log records (logger name, message start) known to be harmless. megatron-core imports
# torch.utils.cpp_extension (its NCCL allocator), which logs this on any machine with a CUDA build of
# torch and a CUDA toolkit but no GPU: a SLURM login node running `--dry-run`, the GPU rehearsal. Our
# own CUDA build (csrc/) reports its own errors where it needs the runtime.
KNOWN_LOG_RECORDS = (
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class _DropKnownRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_known_warnings() -> None:
    """Install the filters of `KNOWN_WARNINGS` and `KNOWN_LOG_RECORDS` (idempotent)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefix in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(known, _DropKnownRecords) and known.prefix == prefix for known in logger.filters):
            logger.addFilter(_DropKnownRecords(prefix))
