"""What every command line of the package shares: one wrapper, :func:`run_command`, and one logging
set-up, :func:`configure_logging`.

    def main(argv=None) -> int:
        return run_command(_main, argv, prog="conan-preprocess")

    def _main(argv) -> int:
        args = command_parser("conan-preprocess", __doc__).parse_args(argv)
        ...

`run_command` sets the offline switches of huggingface_hub, transformers and datasets (nothing here
downloads), sets up logging once and runs the command under :func:`megatron_conan.errors.run_main`:
a user-input error, an argument error of a :func:`command_parser` included, ends in one line on
stderr, ``<prog>: error: <message>``, and exit status 2, never a traceback. With
``handle_stop_signals=True`` (the training stages) SIGTERM / SIGUSR1 are handled from the first moment
(:mod:`megatron_conan.stop_signals`): a signal during start-up ends the command cleanly with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Optional, Sequence

from megatron_conan.errors import InputError, run_main
from megatron_conan.stop_signals import stop_signals_installed

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
"""Set to 1 (unless already set) by every command: models and data sets are local directories."""

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class UsageError(InputError):
    """A command-line argument is missing or malformed (argparse's own message)."""


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose argument errors are raised as :class:`UsageError`, so that they end
    as the wrapper's one line (argparse itself prints its usage first)."""

    def error(self, message: str):
        raise UsageError(message)


def command_parser(prog: Optional[str], description: Optional[str]) -> CommandParser:
    """The parser of a command: named as its console script, its docstring as the description."""
    return CommandParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def set_offline_switches() -> None:
    for switch in OFFLINE_SWITCHES:
        os.environ.setdefault(switch, "1")


class _OursAndTheirs(logging.Filter):
    """Passes our own records from `our_level` up and everyone else's from `their_level` up."""

    def __init__(self, our_level: int, their_level: int):
        super().__init__()
        self.our_level = our_level
        self.their_level = their_level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] == "megatron_conan"
        return record.levelno >= (self.our_level if ours else self.their_level)


def configure_logging(our_level: int = logging.INFO, fmt: str = LOG_FORMAT, their_level: int = logging.WARNING,
                      force: bool = False) -> None:
    """The one logging set-up: our messages from `our_level` up, everyone else's from `their_level`
    up, in one format (`force`: replacing the root handlers already there, as a spawned rank does).
    A filter on the handler rather than logger levels: some libraries set their own logger to DEBUG
    when imported (bm25s says "Building index from IDs objects" on every index), after any level we
    could set. Calling it again replaces the filter."""
    logging.basicConfig(level=min(our_level, their_level), format=fmt, force=force)
    for handler in logging.getLogger().handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, _OursAndTheirs)]
        handler.addFilter(_OursAndTheirs(our_level, their_level))


def run_command(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
                prog: Optional[str] = None, log_level: Optional[int] = logging.WARNING,
                handle_stop_signals: bool = False) -> int:
    """Every console script's `main`: offline switches, logging (ours from `log_level`, others' from
    WARNING; None: `main` calls :func:`configure_logging` itself, as a stage does after its dry
    run), then ``main(argv)``; bad input is one stderr line and status 2. `handle_stop_signals`:
    SIGTERM / SIGUSR1 handling first, for the whole command (:mod:`megatron_conan.stop_signals`);
    with ``argv=None`` (the command line: this process is the command) it stays until the exit, with
    an `argv` (called from Python) the previous handlers come back after the command."""
    if handle_stop_signals:
        with stop_signals_installed(restore=argv is not None):
            return run_command(main, argv, prog, log_level)
    set_offline_switches()
    if log_level is not None:
        configure_logging(log_level)
    return run_main(main, argv, prog=prog)
