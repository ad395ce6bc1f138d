"""The data-generation tests share the conversion tests' fixtures (the mining tests embed with the
session's tiny export and tokenizer; built once per process, see megatron_conan.testing.fixtures)."""

from tests.conversion.conftest import artifacts  # noqa: F401 - a fixture (used by name)

__all__ = ["artifacts"]  # pytest finds it here by name
