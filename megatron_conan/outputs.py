"""Where a tool may write: the one check every command runs on its outputs before any work.

- An output file must have an existing parent directory and must not be a directory.
- An output that is one of the inputs (the same path, a link to it, a hard link) is refused, with
  or without ``--overwrite``: ``conan-mine --input x.jsonl --output x.jsonl`` would replace what it
  is still reading.
- An existing output is replaced only with ``--overwrite``.
- A directory output is replaced (with ``--overwrite``) only when it holds the tool's own record
  (``conan_export.json`` of an export, ``conan_import.json`` of an import, ``manifest.json`` of a
  corpus), and never when it equals, contains or lies inside an input:
  ``conan-convert to-sentence-transformers RUN/checkpoints RUN --overwrite`` would otherwise export
  and then replace the whole run directory with the export.

Everything here only looks; the writes themselves go through :mod:`megatron_conan.atomic_write`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Iterable, Iterator, Optional, Sequence

from megatron_conan import atomic_write
from megatron_conan.errors import InputError


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--overwrite`` switch of every tool that writes outputs."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs that exist (never an input; a directory only if this tool wrote it)")


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def same_file(first: str, second: str) -> bool:
    """Whether two paths name one file or directory (links and hard links included)."""
    if os.path.exists(first) and os.path.exists(second):
        return os.path.samefile(first, second)
    return _real(first) == _real(second)


def _lies_within(inner: str, outer: str) -> bool:
    inner, outer = _real(inner), _real(outer)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _present(paths: Iterable[Optional[str]]) -> list:
    return [path for path in paths if path]


def check_file_target(path: str, creates_parent: bool = False) -> None:
    """`path` can be written as a file: its directory exists (unless the tool `creates_parent`) and
    it is not a directory."""
    if not creates_parent and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise InputError(f"the directory of output {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"output {path} is a directory")


def check_output_files(outputs: Sequence[Optional[str]], inputs: Sequence[Optional[str]] = (),
                       overwrite: bool = False, creates_parent: bool = False) -> None:
    """Refuse (one InputError) an output file that cannot be written, that is one of `inputs`, or
    that exists without `overwrite`. None entries are skipped (an option not given);
    `creates_parent`: the tool makes a missing output directory itself (a dataset prefix)."""
    for output in _present(outputs):
        check_file_target(output, creates_parent)
        for source in _present(inputs):
            if same_file(output, source):
                raise InputError(f"output {output} is also an input ({source}): write it elsewhere")
        if os.path.lexists(output) and not overwrite:
            raise InputError(f"output {output} exists (pass --overwrite to replace it)")


def check_output_dir(path: str, inputs: Sequence[Optional[str]] = (), overwrite: bool = False,
                     record: Optional[str] = None) -> None:
    """Refuse a directory output that cannot be created, or an existing one that may not be
    replaced: without `overwrite`; not a directory; equal to, containing or inside one of
    `inputs`; or without the tool's `record` file (a directory the tool did not write)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"the parent directory of output {path} does not exist")
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise InputError(f"output directory {path} exists (pass --overwrite to replace it)")
    if os.path.islink(path) or not os.path.isdir(path):
        raise InputError(f"output {path} exists and is not a directory: --overwrite replaces only a directory "
                         f"this tool wrote")
    for source in _present(inputs):
        if _lies_within(source, path) or _lies_within(path, source):
            relation = "is" if same_file(path, source) else ("contains" if _lies_within(source, path)
                                                            else "lies inside")
            raise InputError(f"output {path} {relation} input {source}: --overwrite would delete the input; "
                             f"write the output elsewhere")
    if record is None or not os.path.isfile(os.path.join(path, record)):
        raise InputError(f"output {path} was not written by this tool (it has no {record}): --overwrite replaces "
                         f"only the tool's own output; move or remove it yourself")


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False, inputs: Sequence[Optional[str]] = (),
                      record: Optional[str] = None) -> Iterator[str]:
    """Yield a temporary directory beside `path`; on success it replaces `path`, on error it goes.

    The output is checked first (:func:`check_output_dir`), before any work; the directory is then
    committed by :func:`megatron_conan.atomic_write.directory`, so a failure at any point leaves
    either the old output or the new one, never a mixture.
    """
    check_output_dir(path, inputs, overwrite, record)
    with atomic_write.directory(os.path.abspath(path), overwrite) as tmp:
        yield tmp
