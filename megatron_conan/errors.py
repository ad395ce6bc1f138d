"""The errors every entry point shares, and the wrapper that turns them into one line on stderr.

Raise an :class:`InputError` (or a subclass) for anything the *user* got wrong: a configuration
value, a missing or malformed input file, a checkpoint or dataset that does not fit the run. The
message is the whole story in one line and names the field (``optimizer.lr``) or the path; entry points
run under :func:`run_main`, which prints ``<prog>: error: <message>`` and exits with status 2, with
no traceback. Anything else is a bug and keeps its traceback.

    from megatron_conan.errors import InputError, run_main

    def main(argv=None) -> int:
        return run_main(_main, argv)

The classes, by what went wrong:

- :class:`ConfigError`: a configuration value or key (also importable from
  ``megatron_conan.config.model``).
- :class:`CheckpointMismatchError`: a checkpoint written for another model shape or layout (also
  importable from ``megatron_conan.checkpoint.metadata``).
- :class:`DataError`: an input data file (corpus, indexed dataset, tokenizer, contrastive store) is
  malformed or does not fit the run.

Python's own errors for input files are reported the same way without wrapping them:
FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, YAML parse errors and
JSON decode errors.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional, Sequence

import yaml

EXIT_INPUT_ERROR = 2
"""Exit status of a run stopped by bad input (argparse's usage errors use the same)."""


class InputError(Exception):
    """Base class: the user's input is wrong. The message is one line naming the field or path."""


class ConfigError(InputError, ValueError):
    """A configuration value or key is invalid; the message names the dotted field."""


class CheckpointMismatchError(InputError, RuntimeError):
    """A checkpoint was written for a different model shape or an unsupported layout change."""


class DataError(InputError, ValueError):
    """An input data file is malformed or does not fit the run (the message names the file)."""


_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe_input_error(error: BaseException) -> Optional[str]:
    """The one-line message for a user-input error, or None when `error` is not one (a bug)."""
    if isinstance(error, InputError):
        return _one_line(error)
    if isinstance(error, _FILE_ERRORS):
        if error.filename is not None:
            reason = (error.strerror or type(error).__name__).lower()
            return _one_line(f"{reason}: {error.filename}")
        return _one_line(error)
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"{mark.name} line {mark.line + 1} column {mark.column + 1}" if mark else "input"
        return _one_line(f"malformed YAML in {where}: {error.problem or error.context}")
    if isinstance(error, yaml.YAMLError):
        return _one_line(f"malformed YAML: {error}")
    if isinstance(error, json.JSONDecodeError):
        return _one_line(f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}")
    return None


def is_reporting_rank() -> bool:
    """Rank 0 of torchrun (RANK) or srun (SLURM_PROCID), or a plain single process."""
    for variable in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(variable)
        if value is not None and value.strip().isdigit():
            return int(value) == 0
    return True


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
             prog: Optional[str] = None) -> int:
    """Call ``main(argv)``; a user-input error becomes one stderr line (rank 0 only) and status 2.

    Every rank returns 2, so a launcher sees the failure everywhere; only rank 0 prints, so the
    line appears once. Errors that are not user input propagate with their traceback.
    """
    from megatron_conan.warning_filters import silence_known_warnings

    silence_known_warnings()  # noise before the one line
    try:
        return main(argv) or 0
    except Exception as error:  # noqa: BLE001 - sorted into input errors and bugs just below
        message = describe_input_error(error)
        if message is None:
            raise
        if is_reporting_rank():
            name = prog or os.path.basename(sys.argv[0]) or "megatron_conan"
            print(f"{name}: error: {message}", file=sys.stderr)  # user-facing
        return EXIT_INPUT_ERROR
