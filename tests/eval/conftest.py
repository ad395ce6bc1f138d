"""The evaluation tests share the conversion tests' fixtures (offline switches, the session's tiny
checkpoints and exports; built once per process, see megatron_conan.testing.fixtures)."""

from tests.conversion.conftest import artifacts  # noqa: F401 - a fixture (used by name)
