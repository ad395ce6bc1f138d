"""No function of ``megatron_conan/`` runs over 60 lines and no class over 250 (docstring included:
``end_lineno - lineno + 1``): a longer one is doing several jobs; split it into steps, or parts,
that have names. (tests/test_console.py checks that no script edits ``sys.path``.)"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250
QUICKSTART_MAX_LINES = 300


def _python_files(top):
    for directory, _, files in os.walk(os.path.join(REPO, top)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def _long_nodes(source: str, where: str, kinds, limit: int):
    """'where:line name (n lines)' for every node of `kinds` in `source` (nested ones too) over `limit`."""
    return [f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(source, filename=where))
            if isinstance(node, kinds) and node.end_lineno - node.lineno + 1 > limit]


def _long_functions(source: str, where: str):
    """Every function, method or nested function of `source` over the limit."""
    return _long_nodes(source, where, (ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES)


def _long_classes(source: str, where: str):
    """Every class (nested ones too) of `source` over the limit."""
    return _long_nodes(source, where, ast.ClassDef, MAX_CLASS_LINES)


def test_no_class_of_the_package_is_over_250_lines():
    long = []
    for path in _python_files("megatron_conan"):
        with open(path, encoding="utf-8") as handle:
            long += _long_classes(handle.read(), os.path.relpath(path, REPO))
    assert not long, long


def test_the_class_scan_counts_nested_classes_and_docstrings():
    body = "".join(f"    x{i} = {i}\n" for i in range(248))
    fits = 'class Fits:\n    """Doc."""\n' + body  # 250 lines
    over = 'class Outer:\n    class Inner:\n        """One\n        two."""\n' + body.replace("    ", "        ")
    assert _long_classes(fits, "m.py") == []
    assert _long_classes(over, "m.py") == ["m.py:1 Outer (252 lines)", "m.py:2 Inner (251 lines)"]


def test_no_function_of_the_package_is_over_60_lines():
    long = []
    for path in _python_files("megatron_conan"):
        with open(path, encoding="utf-8") as handle:
            long += _long_functions(handle.read(), os.path.relpath(path, REPO))
    assert not long, long


def test_the_scan_counts_methods_nested_functions_and_docstrings():
    def body(indent, n):
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    fits = 'class C:\n    def fits(self):\n        """Doc."""\n' + body("        ", 58)  # 60 lines
    nested = 'def outer():\n    def inner():\n        """One\n        two."""\n' + body("        ", 58) + "    return inner\n"
    assert _long_functions(fits + nested, "m.py") == ["m.py:62 outer (63 lines)", "m.py:63 inner (61 lines)"]



def test_the_main_job_fits_under_300_lines():
    """The job itself (quickstart.py) is its options and its steps in order; the reusable pieces
    live in megatron_conan/jobs/."""
    with open(os.path.join(REPO, "megatron_conan", "quickstart.py"), encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) < QUICKSTART_MAX_LINES
