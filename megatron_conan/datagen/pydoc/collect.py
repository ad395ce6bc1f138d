"""Collecting Python's documentation: every docstring of the standard library and the pydoc topics,
read in an isolated child interpreter, and the parent's side that runs it (`_collected`, cached).

**Collection.** Importing the whole standard library has side effects (``antigravity`` opens a
browser, ``this`` prints, ``X.__main__`` runs a command line), and site-packages can replace
stdlib modules (setuptools' distutils hack). So this file runs itself as a script in a child
interpreter, ``python -I -S`` (no environment variables, no user or site packages, no script
directory on ``sys.path``), with stdin and stdout on /dev/null, imports every public module of
``sys.stdlib_module_names`` and their submodules in name order except the deny-list
(`DENIED_MODULES`, each with its reason), writes the docstrings and signatures as JSON and leaves
with ``os._exit`` (no atexit hook of an imported module runs). Every module is counted: imported,
denied, failed to import (with the exception), or private (leading underscore: implementation
modules whose objects are documented under the public module that exports them). This is why
the module imports only the standard library at top level.

Signatures show a default only when it is a short literal (``None``, a bool, a number, a short
string without a path separator) and ``...`` otherwise, so no memory address or installation path
gets into the corpus.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

# Modules never imported, with why. Everything else public in sys.stdlib_module_names is tried.
DENIED_MODULES: Dict[str, str] = {
    "antigravity": "side effect: opens a web browser on import",
    "this": "side effect: prints the Zen of Python on import",
    "idlelib": "GUI: needs tkinter and a display",
    "tkinter": "GUI: needs Tk and a display, present only in some builds",
    "turtle": "GUI: imports tkinter and needs a display",
    "turtledemo": "GUI: turtle demos, need a display",
    "test, *.test, *.tests": "regression tests, not documentation; some of them act on import",
    "lib2to3": "may write grammar pickle caches into the installation on import",
    "pydoc_data": "read separately: the pydoc topics",
    "encodings.*": "hundreds of generated codec tables with one boilerplate docstring each",
    "*.__main__": "importing a package's __main__ runs its command line",
}

_SAFE_STRING = re.compile(r"^[\w .,:;%+\-*#=!?<>{}()\[\]|&^~'\"]{0,24}$")


def _denied(name: str) -> Optional[str]:
    parts = name.split(".")
    if parts[-1] == "__main__":
        return DENIED_MODULES["*.__main__"]
    if any(part in ("test", "tests") for part in parts):
        return DENIED_MODULES["test, *.test, *.tests"]
    if parts[0] == "encodings" and len(parts) > 1:
        return DENIED_MODULES["encodings.*"]
    return DENIED_MODULES.get(parts[0])


def _safe_default(value) -> str:
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int) and abs(value) < 10 ** 12:
        return repr(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, (str, bytes)) and _SAFE_STRING.match(repr(value)):
        return repr(value)
    if isinstance(value, (tuple, frozenset, dict, list)) and not value:
        return repr(value)
    return "..."


class _Shown(str):
    """A default value that prints as the given text inside ``str(inspect.Signature)``."""

    def __repr__(self) -> str:
        return str(self)


def _signature(obj, drop_self: bool) -> Optional[str]:
    """The call signature without annotations and with only literal defaults, e.g.
    ``(obj, *, skipkeys=False, cls=None, **kw)``; None when Python cannot tell."""
    try:
        signature = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - inspect evaluates C text signatures; any failure: none
        return None
    parameters = list(signature.parameters.values())
    if drop_self and parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    shown = [parameter.replace(
        annotation=inspect.Parameter.empty,
        default=(parameter.default if parameter.default is inspect.Parameter.empty
                 else _Shown(_safe_default(parameter.default))))
        for parameter in parameters]
    try:
        return str(signature.replace(parameters=shown, return_annotation=inspect.Signature.empty))
    except ValueError:  # parameters out of order after dropping self: keep Python's own text
        return None


def _record(module: str, qualname: str, kind: str, doc, signature: Optional[str]) -> Optional[dict]:
    if not isinstance(doc, str) or not doc.strip():
        return None
    return {"module": module, "qualname": qualname, "kind": kind, "doc": doc,
            "signature": signature}


def _member_records(module: str, class_qualname: str, cls, claimed: set) -> List[dict]:
    records = []
    members = vars(cls)
    for name in sorted(members):
        if name.startswith("_"):
            continue
        raw = members[name]
        target = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        if id(target) in claimed:
            continue
        if isinstance(raw, property):
            kind, signature = "attribute", None
        elif inspect.isroutine(target):
            kind, signature = "method", _signature(target, drop_self=not isinstance(raw, staticmethod))
        elif inspect.isgetsetdescriptor(raw) or inspect.ismemberdescriptor(raw):
            kind, signature = "attribute", None
        else:
            continue
        claimed.add(id(target))
        record = _record(module, f"{class_qualname}.{name}", kind, getattr(raw, "__doc__", None),
                         signature)
        if record:
            records.append(record)
    return records


def _module_records(name: str, module, public_modules: set, claimed: set) -> List[dict]:
    """The module's own docstring, then its public classes (with members) and functions."""
    records = []
    module_record = _record(name, name, "module", getattr(module, "__doc__", None), None)
    if module_record:
        records.append(module_record)
    namespace = vars(module)
    for attribute in sorted(namespace):
        obj = namespace[attribute]
        if attribute.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        owner = getattr(obj, "__module__", None)
        # An object belongs to the public module that defines it; one of a private module
        # (`_io`, `_operator`) to the first public module in name order that exports it.
        if owner != name and owner in public_modules or id(obj) in claimed:
            continue
        claimed.add(id(obj))
        qualname = f"{name}.{attribute}"
        if inspect.isclass(obj):
            record = _record(name, qualname, "class", obj.__dict__.get("__doc__"),
                             _signature(obj, drop_self=False))
            if record:
                records.append(record)
            records.extend(_member_records(name, qualname, obj, claimed))
        else:
            record = _record(name, qualname, "function", obj.__doc__,
                             _signature(obj, drop_self=False))
            if record:
                records.append(record)
    return records


def _import_quietly(name: str, skipped: Dict[str, str]):
    try:
        return importlib.import_module(name)
    except BaseException as error:  # noqa: BLE001 - SystemExit and platform errors count too
        message = str(error).splitlines()[0] if str(error) else ""
        # Installation paths in messages would make the manifest machine-dependent.
        message = re.sub(r"\s*\([^)]*[/\\][^)]*\)", "", message)[:160]
        skipped[name] = f"import failed: {type(error).__name__}: {message}".rstrip(": ")
        return None


def _import_standard_library() -> Tuple[List[str], Dict[str, str], int]:
    """Imports every public stdlib module and submodule not denied, in name order. Returns the
    imported names, the skipped ones with their reason, and the number of private ones."""
    imported, skipped, private = [], {}, 0
    pending = sorted(name for name in sys.stdlib_module_names)
    while pending:
        name = pending.pop(0)
        if any(part.startswith("_") for part in name.split(".")):
            private += 1
            continue
        reason = _denied(name)
        if reason:
            skipped[name] = f"denied: {reason}"
            continue
        module = _import_quietly(name, skipped)
        if module is None:
            continue
        imported.append(name)
        if hasattr(module, "__path__"):
            children = sorted(f"{name}.{info.name}" for info in pkgutil.iter_modules(module.__path__))
            pending = children + pending
    return imported, skipped, private


def _collect_in_this_interpreter() -> dict:
    """The child's work: import, then read every docstring and the pydoc topics."""
    warnings.simplefilter("ignore")  # deprecation warnings of PEP 594 modules are expected
    imported, skipped, private = _import_standard_library()
    public = set(imported)
    claimed: set = set()
    records = []
    for name in sorted(imported):
        records.extend(_module_records(name, sys.modules[name], public, claimed))
    from pydoc_data.topics import topics

    return {
        "python": {"implementation": sys.implementation.name,
                   "version": ".".join(str(part) for part in sys.version_info[:3]),
                   "platform": sys.platform},
        "modules_imported": sorted(imported),
        "modules_skipped": dict(sorted(skipped.items())),
        "modules_private": private,
        "records": records,
        "topics": {key: topics[key] for key in sorted(topics)},
    }


def _child_main(output_path: str) -> None:
    data = _collect_in_this_interpreter()
    with open(output_path, "w", encoding="utf-8") as stream:
        json.dump(data, stream, ensure_ascii=False)
    # Skip interpreter shutdown: atexit hooks of the ~500 imported modules are not ours to run.
    os._exit(0)


def _run_child(python: str) -> dict:
    from megatron_conan.errors import DataError  # not at the top: the child runs this file isolated

    with tempfile.TemporaryDirectory(prefix="pydoc-collect-") as directory:
        output = os.path.join(directory, "collected.json")
        try:
            completed = subprocess.run(
                [python, "-I", "-S", os.path.abspath(__file__), "--collect-into", output],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                cwd=directory, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DataError(f"cannot collect Python's documentation with {python}: {error}") from error
        if completed.returncode != 0 or not os.path.exists(output):
            tail = completed.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"collecting Python's documentation with {python} failed "
                            f"(status {completed.returncode}): {tail[0]}")
        with open(output, encoding="utf-8") as stream:
            return json.load(stream)


@lru_cache(maxsize=4)
def _collected(python: str) -> dict:
    return _run_child(python)


if __name__ == "__main__":  # the isolated child interpreter that `_run_child` starts
    if len(sys.argv) == 3 and sys.argv[1] == "--collect-into":
        _child_main(sys.argv[2])
    sys.exit(f"usage: python -I -S {os.path.basename(__file__)} --collect-into OUTPUT.json")
