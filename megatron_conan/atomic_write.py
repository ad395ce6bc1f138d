"""Every durable write of the package goes through here: one file, one directory, a set of files
that must appear together, and the renames of the checkpoint protocol. No other module renames
files.

The rules, the same for every writer:

- New content is written under a temporary name in the destination's own directory (a rename does
  not cross file systems), created exclusively (``mkstemp`` / ``mkdtemp``), so the clean-up can
  only ever delete what this process made. The names are hidden: ``.<name>.tmp-XXXXXXXX``.
- Before the rename every written file is fsynced; after it the parent directory is, so a power
  loss leaves the old output or the new one, not an empty file under the final name.
- An exception (``KeyboardInterrupt`` and ``SystemExit`` included) removes the temporary. Only a
  SIGKILL or a power loss can leave one behind, never a partial output under the final name.
- Temporaries get the permissions a plain ``open`` / ``mkdir`` would (``mkstemp``'s 0600 would make
  every output private).
- An existing directory is replaced only when the caller says ``overwrite``; it is moved aside
  first and deleted only after the new one is in place. (Whether a command may say so is
  :mod:`megatron_conan.outputs`' check.)
- A set of files is replaced by a journalled commit (:class:`FileSet`): a crash leaves the old set,
  or a journal from which the next writer or reader finishes the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from typing import Dict, Iterator, List, Sequence


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str) -> None:
    """fsync a file or a directory by name."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(path: str) -> None:
    """fsync every regular file and directory under `path` (`path` included), deepest first."""
    for directory, _, files in os.walk(path, topdown=False):
        for name in files:
            file_path = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(file_path).st_mode):
                fsync_path(file_path)
        fsync_path(directory)


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def rename(source: str, destination: str) -> None:
    """Rename `source` to `destination` (replacing a file, or an empty directory) and make the
    rename durable: the parent directories are fsynced."""
    os.replace(source, destination)
    fsync_path(_parent(destination))
    if _parent(source) != _parent(destination):
        fsync_path(_parent(source))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def file(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path` to write; on a normal exit it is fsynced and renamed to
    `path` (replacing it), on an exception it is removed. The parent directory must exist."""
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=_parent(path))
    os.close(handle)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        fsync_path(tmp)
        rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def text(path: str, content: str) -> None:
    """Write `content` (UTF-8) to `path` atomically."""
    with file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(content)


@contextlib.contextmanager
def directory(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside `path` to fill; on a normal exit everything in it is
    fsynced and it is renamed to `path`, on an exception it is deleted.

    An existing `path` is an error unless `overwrite`; then it is moved aside before the rename and
    deleted after it, so a failure at any point leaves the old output or the new one, not a mixture.
    """
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=_parent(path))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        fsync_tree(tmp)
        _replace_directory(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(tmp: str, path: str, overwrite: bool) -> None:
    if not os.path.lexists(path):
        rename(tmp, path)
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists")
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=_parent(path))
    os.rmdir(retired)  # a name no one else holds, for the old output
    rename(path, retired)
    rename(tmp, path)
    _remove(retired)


COMMIT_JOURNAL = "COMMITTING"
"""Written into a FileSet's staging directory once every new file is complete and synced: from then
on the commit can only go forward (:func:`finish_interrupted_commits`)."""


class FileSet:
    """Files of one directory that appear together: written at `tmp(path)`, renamed by `commit()`.

    The temporaries live in one hidden staging directory beside the outputs, so a tool that writes
    several files from one prefix (SentencePiece's ``.model`` and ``.vocab``) can write there too
    (`staging_prefix`). Leaving the ``with`` block without `commit()` (or with an exception)
    deletes the staging directory.

    The commit: every new file is synced, then the journal (:data:`COMMIT_JOURNAL`, the names in
    order) is written into the staging directory and synced; the old marker (the last output) is
    removed, so a half-replaced set never looks complete; each new file replaces its old one, the
    marker last. A crash before the journal leaves the old set untouched; after it,
    :func:`finish_interrupted_commits` (run by the next FileSet in the directory and by the dataset
    readers) moves the rest of the new set in. Nothing of the old set is deleted before the new one
    is complete on disk.
    """

    def __init__(self, final_paths: Sequence[str]):
        self.final_paths = [os.path.abspath(path) for path in final_paths]
        parents = {_parent(path) for path in self.final_paths}
        if len(parents) != 1:
            raise ValueError(f"a FileSet's files share one directory, not {sorted(parents)}")
        (parent,) = parents
        finish_interrupted_commits(parent)
        first = os.path.basename(self.final_paths[-1])
        self.staging = tempfile.mkdtemp(prefix=f".{first}.tmp-", dir=parent)
        self.temporary: Dict[str, str] = {
            path: os.path.join(self.staging, os.path.basename(path)) for path in self.final_paths}

    def tmp(self, final_path: str) -> str:
        return self.temporary[os.path.abspath(final_path)]

    def staging_prefix(self, final_prefix: str) -> str:
        """Where a writer that appends suffixes to a prefix writes: `tmp(final_prefix + suffix)`
        equals ``staging_prefix(final_prefix) + suffix``."""
        return os.path.join(self.staging, os.path.basename(final_prefix))

    def commit(self) -> None:
        for path in self.final_paths:
            fsync_path(self.temporary[path])
        names = [os.path.basename(path) for path in self.final_paths]
        journal = os.path.join(self.staging, COMMIT_JOURNAL)
        with open(journal, "w", encoding="utf-8") as handle:
            json.dump(names, handle)
        fsync_path(journal)
        fsync_path(self.staging)
        _move_in(self.staging, names)
        self.abort()

    def abort(self) -> None:
        """Delete the staging directory and whatever is in it (after `commit()`: nothing)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "FileSet":
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()


def _move_in(staging: str, names: Sequence[str]) -> None:
    """Move the staged `names` into the staging directory's parent, the last (the marker) removed
    first and renamed last. A name already moved (by a concurrent recovery) is skipped."""
    parent = _parent(staging)
    marker = os.path.join(parent, names[-1])
    if os.path.lexists(os.path.join(staging, names[-1])) and os.path.isfile(marker):
        os.remove(marker)  # the new set is complete in staging: the old marker goes first
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.replace(os.path.join(staging, name), os.path.join(parent, name))
    fsync_path(parent)


def finish_interrupted_commits(directory: str) -> List[str]:
    """Finish every FileSet commit in `directory` that stopped after its journal (a crash or a kill
    mid-commit); returns the staging directories finished. A staging directory without a journal
    (a write that never reached its commit) is left alone: its temporaries are not an output."""
    finished = []
    try:
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return finished
    for entry in entries:
        journal = os.path.join(directory, entry, COMMIT_JOURNAL)
        if not (entry.startswith(".") and ".tmp-" in entry and os.path.isfile(journal)):
            continue
        with open(journal, encoding="utf-8") as handle:
            names = json.load(handle)
        if not (isinstance(names, list) and names and all(
                isinstance(name, str) and name == os.path.basename(name) and name not in ("", ".", "..")
                for name in names)):
            continue  # not a journal this module wrote
        _move_in(os.path.join(directory, entry), names)
        shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
        finished.append(os.path.join(directory, entry))
    return finished
