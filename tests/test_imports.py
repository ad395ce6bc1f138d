"""Import structure of the package: the layer order of docs/DESIGN.md section 13 holds (no module
imports a higher layer) and no modules import each other in a circle; library code never imports
``megatron_conan.testing`` (testing may import the library), the modules of ``megatron_conan/data/``, ``preprocess/`` and ``datagen/``
import each other without cycles and data/ does not import preprocess/, ``megatron_conan.checkpoint`` sits below training, conversion and
eval (and conversion does not import training), only ``megatron_conan.atomic_write`` renames
files, and the preprocessing tool starts without torch or megatron-core. Imports inside functions
and under ``if TYPE_CHECKING:`` count in the graph tests: a lazy or type-only import is still a
dependency."""

import ast
import os
import re
import subprocess
import sys
from typing import Dict, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "megatron_conan")
DESIGN = os.path.join(ROOT, "docs/DESIGN.md")
LAYERS_HEADING = "## 13. Package layers"

# Imports against the layer order that another piece of issue 32 removes, each as
# (importing module, imported module): why, and which piece. Keep it short; an entry whose import is
# gone fails the test, so the list cannot go stale.
LAYER_EXCEPTIONS: Dict[Tuple[str, str], str] = {}


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-len(".py")].split(os.sep)
    return ".".join(relative[:-1] if relative[-1] == "__init__" else relative)


def _imports(path: str, module: str) -> Set[str]:
    """Every megatron_conan module `path` imports (``from a import b`` counts a.b when that is a module)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from a import b` imports the module a.b where there is one, else a name of a: only
            # then is it an import of a (a.b's parent package is imported either way, as by any import)
            found.update(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base
                         for alias in node.names)
    return {name for name in found if name == "megatron_conan" or name.startswith("megatron_conan.")}


def _is_module(name: str) -> bool:
    path = os.path.join(os.path.dirname(PACKAGE_DIR), *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def _graph() -> Dict[str, Set[str]]:
    modules = {}
    for directory, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                modules[_module_name(path)] = path
    return {module: {name for name in _imports(path, module) if name in modules} | {
        name for name in _imports(path, module) if name.startswith("megatron_conan.testing")}
        for module, path in modules.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every elementary cycle's representative: one path per strongly connected component."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _package(module: str) -> str:
    """The top-level package or module of `module` below megatron_conan ("megatron_conan" for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layers() -> Dict[str, int]:
    """{package: layer} from the numbered list under docs/DESIGN.md's layer heading."""
    with open(DESIGN, encoding="utf-8") as handle:
        text = handle.read()
    assert LAYERS_HEADING in text, f"docs/DESIGN.md has no section {LAYERS_HEADING!r}"
    section = text.split(LAYERS_HEADING, 1)[1].split("\n## ", 1)[0]
    layers = {}
    for number, names in re.findall(r"^ +(\d+)\. (.+)$", section, flags=re.MULTILINE):
        for name in names.split(","):
            assert name.strip() not in layers, f"{name.strip()} is in two layers of docs/DESIGN.md"
            layers[name.strip()] = int(number)
    return layers


def _upward(graph: Dict[str, Set[str]], layers: Dict[str, int]) -> List[Tuple[str, str]]:
    """Every (importer, imported) pair where the imported module sits in a higher layer."""
    rank = dict(layers, megatron_conan=0)  # the root package holds only the version
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if rank[_package(target)] > rank[_package(module)])


def test_the_walk_sees_the_package():
    graph = _graph()
    assert "megatron_conan.distributed.parallel" in graph
    assert "megatron_conan.distributed.cpu_compat" in graph["megatron_conan.distributed.parallel"]
    assert "megatron_conan.distributed.spawn" in graph["megatron_conan.testing.distributed"]
    assert "megatron_conan.distributed.ports" in graph["megatron_conan.testing.ports"]
    # imports inside functions count too, and type-only ones
    assert "megatron_conan.distributed.cpu_compat" in graph["megatron_conan.distributed.spawn"]
    assert "megatron_conan.training.dry_run" in graph["megatron_conan.training.stage_main"]
    # `from package import submodule` is an import of the submodule, not of the package's __init__
    assert "megatron_conan.ops.soft_mask_attention" not in graph["megatron_conan.ops.soft_mask_attention.function"]


def test_every_package_has_a_layer_and_no_import_goes_up():
    """docs/DESIGN.md section 13's order, lowest first: a module imports its own layer or lower ones."""
    layers, graph = _layers(), _graph()
    assert len(layers) > 20 and layers["errors"] < layers["config"] < layers["training"] < layers["cli"], layers
    unplaced = sorted({_package(module) for module in graph} - set(layers) - {"megatron_conan"})
    assert not unplaced, f"give these a layer in docs/DESIGN.md section 13: {unplaced}"
    upward = _upward(graph, layers)
    offenders = [f"{module} (layer {layers[_package(module)]}) imports {target} (layer {layers[_package(target)]})"
                 for module, target in upward if (module, target) not in LAYER_EXCEPTIONS]
    assert not offenders, offenders
    stale = sorted(set(LAYER_EXCEPTIONS) - set(upward))
    assert not stale, f"these exceptions no longer import upward; remove them: {stale}"


def test_the_layer_check_finds_upward_imports():
    graph = {"megatron_conan.config.run": {"megatron_conan.models.conan", "megatron_conan.errors"},
             "megatron_conan.models.conan": {"megatron_conan.config.model"}}
    layers = {"errors": 1, "config": 2, "models": 3}
    assert _upward(graph, layers) == [("megatron_conan.config.run", "megatron_conan.models.conan")]


def test_no_modules_or_packages_import_each_other_in_a_circle():
    graph = _graph()
    assert not _cycles(graph), _cycles(graph)
    packages: Dict[str, Set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(_package(module), set()).update(
            _package(target) for target in targets if _package(target) != _package(module))
    assert not _cycles(packages), _cycles(packages)


def test_library_code_does_not_import_testing():
    offenders = sorted(f"{module} imports {target}" for module, targets in _graph().items()
                       if not module.startswith("megatron_conan.testing")
                       for target in targets if target.startswith("megatron_conan.testing"))
    assert not offenders, offenders


DATA_PACKAGES = ("megatron_conan.data.", "megatron_conan.preprocess.", "megatron_conan.datagen.")


def test_data_modules_have_no_import_cycles():
    data = {module: {target for target in targets if target.startswith(DATA_PACKAGES)}
            for module, targets in _graph().items() if module.startswith(DATA_PACKAGES)}
    assert len(data) > 20, sorted(data)  # the walk sees the three packages
    assert not _cycles(data), _cycles(data)


def test_data_does_not_import_preprocessing_and_the_task_table_imports_only_errors():
    """The contrastive store's reader (data/) and writer (preprocess/) share data/contrastive_format.py
    below both; the task table, which both read, sits under everything."""
    graph = _graph()
    upward = sorted(f"{module} imports {target}" for module, targets in graph.items()
                    if module.startswith("megatron_conan.data.")
                    for target in targets if target.startswith("megatron_conan.preprocess"))
    assert not upward, upward
    assert graph["megatron_conan.tasks"] == {"megatron_conan.errors"}
    for reader_and_writer in ("megatron_conan.data.contrastive", "megatron_conan.preprocess.contrastive_tokenize"):
        assert "megatron_conan.data.contrastive_format" in graph[reader_and_writer]


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_checkpoint_package_sits_below_training_conversion_and_eval():
    graph = _graph()
    above = ("megatron_conan.training", "megatron_conan.conversion", "megatron_conan.eval")
    offenders = sorted(f"{module} imports {target}" for module, targets in graph.items()
                       if module.startswith("megatron_conan.checkpoint")
                       for target in targets if target.startswith(above))
    assert not offenders, offenders
    conversion_to_training = sorted(f"{module} imports {target}" for module, targets in graph.items()
                                    if module.startswith("megatron_conan.conversion")
                                    for target in targets if target.startswith("megatron_conan.training"))
    assert not conversion_to_training, conversion_to_training
    assert "megatron_conan.checkpoint.save" in graph["megatron_conan.training.trainer"]
    assert "megatron_conan.checkpoint.standalone" in graph["megatron_conan.conversion.export"]


def test_only_the_atomic_write_module_renames_files():
    renaming = set()
    for directory, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as handle:
                    tree = ast.parse(handle.read(), filename=path)
                if any(isinstance(node, ast.Attribute) and node.attr in ("replace", "rename", "renames")
                       and isinstance(node.value, ast.Name) and node.value.id == "os" for node in ast.walk(tree)):
                    renaming.add(_module_name(path))
    assert renaming == {"megatron_conan.atomic_write"}, sorted(renaming)


def test_the_preprocessing_tool_starts_without_torch_or_megatron_core():
    """Every preprocessing worker imports the tool's module again (spawn), so torch or megatron-core
    there costs each process ~4 s: a one-document run went from 0.7 s to 11 s when the contrastive
    path's import moved to the module top. Only `--format contrastive` may load them, in the parent."""
    probe = ("import sys, megatron_conan.cli.preprocess\n"
             "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
