"""The one atomic-write helper: a failure part-way leaves neither a partial output nor a temporary;
a directory and a set of files appear whole; an existing directory is replaced only on request."""

import os

import pytest

from megatron_conan import atomic_write


class Stop(Exception):
    pass


def _names(directory):
    return sorted(os.listdir(directory))


def test_a_file_appears_whole_with_ordinary_permissions(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write.text(str(target), "new\n")
    assert target.read_text() == "new\n" and _names(tmp_path) == ["out.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~mask


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with pytest.raises(Stop):
        with atomic_write.file(str(target)) as tmp:
            with open(tmp, "w") as handle:
                handle.write("half of the new")
            raise Stop
    assert target.read_text() == "old\n" and _names(tmp_path) == ["out.txt"]


def test_a_failure_mid_write_leaves_no_output_at_all(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_write.file(str(tmp_path / "out.bin")) as tmp:
            open(tmp, "wb").close()
            raise KeyboardInterrupt
    assert _names(tmp_path) == []


def _fill(tmp, name):
    with open(os.path.join(tmp, name), "w") as handle:
        handle.write(name)


def test_a_directory_commit_replaces_only_on_request(tmp_path):
    target = tmp_path / "export"
    with atomic_write.directory(str(target)) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        _fill(tmp, os.path.join("sub", "a.txt"))
    assert _names(target) == ["sub"] and _names(tmp_path) == ["export"]
    for overwrite, error in ((False, FileExistsError), (True, Stop)):  # refused; failed part-way
        with pytest.raises(error):
            with atomic_write.directory(str(target), overwrite=overwrite) as tmp:
                _fill(tmp, "b.txt")
                if overwrite:
                    raise Stop
        assert _names(target) == ["sub"] and _names(tmp_path) == ["export"]
    with atomic_write.directory(str(target), overwrite=True) as tmp:
        _fill(tmp, "b.txt")
    assert _names(target) == ["b.txt"] and _names(tmp_path) == ["export"]


def test_a_file_set_appears_together_or_not_at_all(tmp_path):
    prefix = str(tmp_path / "data")
    (tmp_path / "data.idx").write_text("old marker")
    paths = [prefix + ".bin", prefix + ".meta.json", prefix + ".idx"]
    with atomic_write.FileSet(paths) as files:
        assert files.staging_prefix(prefix) + ".bin" == files.tmp(prefix + ".bin")
        for path in paths:
            with open(files.tmp(path), "w") as handle:
                handle.write(os.path.basename(path))
        assert _names(tmp_path) == sorted(["data.idx", os.path.basename(files.staging)])  # nothing new yet
        files.commit()
    assert _names(tmp_path) == ["data.bin", "data.idx", "data.meta.json"]
    assert (tmp_path / "data.idx").read_text() == "data.idx"


def test_an_abandoned_file_set_leaves_nothing(tmp_path):
    paths = [str(tmp_path / "a.model"), str(tmp_path / "a.vocab")]
    with pytest.raises(Stop):
        with atomic_write.FileSet(paths) as files:
            open(files.tmp(paths[0]), "w").close()
            raise Stop
    assert _names(tmp_path) == []
    with pytest.raises(ValueError):
        atomic_write.FileSet([str(tmp_path / "a"), str(tmp_path / "sub" / "b")])


def test_a_rename_replaces_the_destination(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    atomic_write.rename(str(tmp_path / "a"), str(tmp_path / "b"))
    assert _names(tmp_path) == ["b"] and (tmp_path / "b").read_text() == "a"


def test_clean_up_never_removes_a_file_it_did_not_make(tmp_path):
    target = tmp_path / "out.txt"
    foreign = tmp_path / f"out.txt.tmp-{os.getpid()}"  # the name the old writers used, and removed
    foreign.write_text("someone else's")
    hidden = tmp_path / ".out.txt.tmp-abcdefgh"
    hidden.write_text("someone else's too")
    with pytest.raises(Stop):
        with atomic_write.file(str(target)) as tmp:
            assert tmp not in (str(foreign), str(hidden))
            raise Stop
    assert foreign.read_text() == "someone else's" and hidden.read_text() == "someone else's too"
    assert _names(tmp_path) == sorted([".out.txt.tmp-abcdefgh", f"out.txt.tmp-{os.getpid()}"])


def _staged_set(tmp_path):
    prefix = str(tmp_path / "data")
    for suffix in (".bin", ".idx"):
        (tmp_path / f"data{suffix}").write_text(f"old{suffix}")
    paths = [prefix + ".bin", prefix + ".meta.json", prefix + ".idx"]
    files = atomic_write.FileSet(paths)
    for path in paths:
        with open(files.tmp(path), "w") as handle:
            handle.write("new" + path[len(prefix):])
    return files


def test_a_crash_mid_commit_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    """Killed after the journal, with one new file in: the old marker is gone (the mixed set never
    looks complete) and the next FileSet or reader moves the rest in; killed before the journal, the
    old set is untouched."""
    real_replace = os.replace
    moved = []

    def crash_after_one(source, destination):
        if moved:
            raise Stop
        moved.append(destination)
        real_replace(source, destination)

    files = _staged_set(tmp_path)
    monkeypatch.setattr(os, "replace", crash_after_one)
    with pytest.raises(Stop):
        files.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "data.idx").exists() and (tmp_path / "data.bin").read_text() == "new.bin"
    assert atomic_write.finish_interrupted_commits(str(tmp_path)) == [files.staging]
    assert _names(tmp_path) == ["data.bin", "data.idx", "data.meta.json"]
    assert [(tmp_path / f"data{s}").read_text() for s in (".bin", ".meta.json", ".idx")] == [
        "new.bin", "new.meta.json", "new.idx"]

    files = _staged_set(tmp_path)
    monkeypatch.setattr(atomic_write, "fsync_path", lambda path: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        files.commit()  # stopped while syncing the new files: no journal yet
    assert atomic_write.finish_interrupted_commits(str(tmp_path)) == []
    assert (tmp_path / "data.idx").read_text() == "old.idx" and (tmp_path / "data.bin").read_text() == "old.bin"
