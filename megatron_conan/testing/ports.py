"""The free-port helper, where the tests have long imported it from; it lives in the library
(``megatron_conan.distributed.ports``) because library code uses it and must not import testing/."""

from megatron_conan.distributed.ports import free_port

__all__ = ["free_port"]
