"""Which third-party modules the GPU check loads, read from its source, and a check that they import.

The check's code is the entry modules below and every module of this repository they import,
followed through function-level imports too (the parts import their benchmarks lazily): an
over-approximation of what a run loads, so a bundle that satisfies it cannot miss a module a part
reaches. An import inside ``try: ... except ImportError`` (or ``Exception``) is optional: the
code runs without it (Transformer Engine, W&B).

:func:`run_import_check` imports each module in a fresh interpreter, the way the rehearsal does on
the node's venv with the bundle on its path; in a test, ``only`` makes this machine's environment
look like the node: the child sees only the named distributions, as it would there.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from packaging.utils import canonicalize_name

from megatron_conan.gpu_node.inventory import REPO

ENTRY_MODULES = ("megatron_conan.cli.gpu_check", "benchmarks.gpu_check", "benchmarks.gpu_check_parts")
FIRST_PARTY = ("megatron_conan", "benchmarks")
_OPTIONAL_HANDLERS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


@dataclasses.dataclass(frozen=True)
class CheckImports:
    required: Tuple[str, ...]
    """Third-party modules (dotted, as imported) the check's code imports unguarded."""
    optional: Tuple[str, ...]
    """Those imported only inside a try that catches ImportError: the code runs without them."""

    @property
    def top_level(self) -> Tuple[str, ...]:
        """The required modules' top-level names (``megatron`` of ``megatron.core``)."""
        return tuple(sorted({name.split(".")[0] for name in self.required}))


def _source_path(repo: str, module: str) -> Optional[str]:
    base = os.path.join(repo, *module.split("."))
    for path in (os.path.join(base, "__init__.py"), base + ".py"):
        if os.path.isfile(path):
            return path
    return None


def _guarded_nodes(tree: ast.AST) -> Set[int]:
    """ids of the import nodes inside a try whose handlers let a failed import pass."""
    guarded = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {"Exception" if kind is None else getattr(kind, "id", getattr(kind, "attr", "")) for kind in types}
        if caught & _OPTIONAL_HANDLERS:
            guarded |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return guarded


def _imported_names(node: ast.AST, package: str) -> List[str]:
    """Absolute dotted names an import statement may load (a from-import's names may be submodules)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parent = package.split(".")
        parent = parent[:len(parent) - node.level + 1]
        base = ".".join(parent + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def check_imports(repo: str = REPO, entries: Sequence[str] = ENTRY_MODULES) -> CheckImports:
    """The third-party modules the check's code (`entries` and the repository modules they reach) imports."""
    seen: Set[str] = set()
    todo = list(entries)
    required: Set[str] = set()
    optional: Set[str] = set()
    while todo:
        module = todo.pop()
        path = _source_path(repo, module) if module not in seen else None
        seen.add(module)
        if path is None:
            continue
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        guarded = _guarded_nodes(tree)
        for node in ast.walk(tree):
            for name in _imported_names(node, package):
                top = name.split(".")[0]
                if top in FIRST_PARTY:
                    parts = name.split(".")
                    todo.extend(".".join(parts[:end]) for end in range(1, len(parts) + 1))
                elif top not in sys.stdlib_module_names and top != "__future__":
                    (optional if id(node) in guarded else required).add(name)
    optional -= required
    return CheckImports(required=tuple(sorted(required)), optional=tuple(sorted(optional)))


_CHILD = r"""
import importlib, json, sys
modules, optional = json.loads(sys.argv[1])

def load(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:  # `from module import attribute` lists module.attribute too
        parent, _, attribute = name.rpartition(".")
        if error.name != name or not parent or not hasattr(importlib.import_module(parent), attribute):
            raise

failed = {}
for name in modules + optional:
    try:
        load(name)
    except Exception as error:  # what any import raises, reported by name
        if name in modules:
            failed[name] = f"{type(error).__name__}: {error}"
print(json.dumps(failed))  # the rehearsal reads this line
"""


def run_import_check(modules: CheckImports, python: str = sys.executable, path: Sequence[str] = (),
                     only: Optional[Iterable[str]] = None, cwd: str = REPO,
                     env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Import every module of `modules` in a fresh `python` with `path` in front of PYTHONPATH;
    {module: error} of the required ones that fail (optional ones may fail). `only`: canonical names
    of the only installed distributions the child may see (a site of links to them replaces
    site-packages), to make this environment look like another machine's."""
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("TRITON_INTERPRET", "1")  # triton's import must not need a GPU driver
    payload = json.dumps([list(modules.required), list(modules.optional)])
    with tempfile.TemporaryDirectory(prefix="node_site_") as site:
        flags = []
        if only is not None:
            _link_distributions(set(only), site)
            path, flags = [*path, site], ["-S"]  # -S: no site-packages but the links
        # a simulated machine sees no inherited PYTHONPATH either (an overlay such as the
        # rehearsal's suite dependencies would otherwise show it what it lacks)
        inherited = [child_env.get("PYTHONPATH")] if only is None else []
        child_env["PYTHONPATH"] = os.pathsep.join([*path, cwd, *filter(None, inherited)])
        result = subprocess.run([python, *flags, "-c", _CHILD, payload], cwd=cwd, env=child_env,
                                capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the import check stopped: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _link_distributions(names: Set[str], site: str) -> None:
    """Link the top-level files of this environment's distributions named in `names` into `site`."""
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in names:
            continue
        for top in {str(file).split("/", 1)[0] for file in dist.files or () if not str(file).startswith("..")}:
            link = os.path.join(site, top)
            source = str(dist.locate_file(top))
            if not os.path.lexists(link) and os.path.exists(source):
                os.symlink(source, link)
