"""The multi-process test harness: :func:`run_distributed` runs a test body on N spawned ranks
(gloo on CPU, NCCL with one GPU per rank). It lives in the library,
``megatron_conan.distributed.spawn``, because the quickstart uses it too and library code must not
import testing/; the tests import it from here."""

from megatron_conan.distributed.spawn import harness_backend, run_distributed

__all__ = ["harness_backend", "run_distributed"]
