"""Huge and hostile input files, and a driver that runs the tools on them and measures each run's
peak resident memory (tests/data/test_hostile_inputs.py).

:func:`write_hostile_corpus` makes, in a directory of the caller's (nothing here is committed):

    huge.jsonl          a 2 GiB sparse file of NUL bytes, no newline (``truncate``: no disk used)
    nul.jsonl           64 KiB of NUL bytes
    deep.jsonl          one line of JSON nested 10,000 deep
    invalid_utf8.jsonl  lines of bytes that are not UTF-8
    directory.jsonl     a directory where a file is expected
    truncated.{bin,idx} an indexed dataset whose .idx lost its last bytes
    claims.{bin,idx}    an .idx header that announces 10^12 sequences in a 34-byte file

``python -m megatron_conan.testing.hostile CASES.json`` runs each case ``{"module", "argv"}`` as
``module.main(argv)`` in this one process (imports paid once) and prints, per case, the exit
status, stdout, stderr and the peak resident set size of the run: ``VmHWM`` of /proc/self/status,
reset before each case by writing 5 to /proc/self/clear_refs (Linux).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import struct
import sys
from typing import Any, Dict, List

HUGE_BYTES = 2 << 30
DEEP_LEVELS = 10_000
CLAIMED_SEQUENCES = 10 ** 12


def _write_index_header(path: str, num_sequences: int, num_documents: int) -> None:
    from megatron_conan.data.indexed import INDEX_HEADER

    with open(path, "wb") as stream:
        stream.write(INDEX_HEADER + struct.pack("<QBQQ", 1, 8, num_sequences, num_documents))


def write_hostile_corpus(directory: str) -> Dict[str, str]:
    """The files of the module docstring in `directory`; returns name -> path (indexed datasets
    by prefix)."""
    from megatron_conan.data.indexed import IndexedDatasetWriter

    import numpy

    paths = {name: os.path.join(directory, name) for name in (
        "huge.jsonl", "nul.jsonl", "deep.jsonl", "invalid_utf8.jsonl", "directory.jsonl")}
    with open(paths["huge.jsonl"], "wb") as stream:
        stream.truncate(HUGE_BYTES)  # sparse: reads as NUL bytes, occupies no blocks
    with open(paths["nul.jsonl"], "wb") as stream:
        stream.write(b"\0" * (64 << 10))
    with open(paths["deep.jsonl"], "w", encoding="ascii") as stream:
        stream.write('{"text": ' + "[" * DEEP_LEVELS + "]" * DEEP_LEVELS + "}\n")
    with open(paths["invalid_utf8.jsonl"], "wb") as stream:
        stream.write(b'{"text": "\xff\xfe not UTF-8 \xc3\x28"}\n' * 3)
    os.mkdir(paths["directory.jsonl"])
    for name in ("truncated", "claims"):
        prefix = paths[name] = os.path.join(directory, name)
        with IndexedDatasetWriter(prefix, numpy.uint16) as writer:
            writer.add_document([[5, 6, 7], [8, 9]])
            writer.commit()
    with open(paths["truncated"] + ".idx", "r+b") as stream:
        stream.truncate(os.path.getsize(paths["truncated"] + ".idx") - 5)
    _write_index_header(paths["claims"] + ".idx", CLAIMED_SEQUENCES, 2)
    return paths


def _peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(re.search(r"VmHWM:\s+(\d+) kB", handle.read()).group(1)) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def run_case(module: str, argv: List[str]) -> Dict[str, Any]:
    """``module.main(argv)`` with its output captured and its peak resident memory measured."""
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    _reset_peak_rss()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        except BaseException as error:  # noqa: BLE001 - a crash is a result the test reports
            code = f"raised {type(error).__name__}: {error}"
    return {"module": module, "argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "peak_rss_bytes": _peak_rss_bytes()}


def main(argv=None) -> int:
    (cases_path,) = argv if argv is not None else sys.argv[1:]
    with open(cases_path, encoding="utf-8") as handle:
        cases = json.load(handle)
    results = [run_case(case["module"], case["argv"]) for case in cases]
    print(json.dumps(results))  # the test reads this
    return 0


if __name__ == "__main__":
    sys.exit(main())
