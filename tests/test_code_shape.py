"""No function of ``megatron_conan/`` runs over 80 lines: a longer one is doing several jobs; split it
where a helper has a name. (tests/test_console.py checks that no script edits ``sys.path``.)"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 80


def _python_files(top):
    for directory, _, files in os.walk(os.path.join(REPO, top)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def _tree(path):
    with open(path, encoding="utf-8") as handle:
        return ast.parse(handle.read(), filename=path)


def test_no_function_of_the_package_is_over_80_lines():
    long = [f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in _python_files("megatron_conan") for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long

