"""The GPU node's declared software and the project's own requirements, both read from the repository.

The inventory (``benchmarks/gpu_node_inventory.txt``) is one ``name==version`` (any PEP 440
specifier), a bare name, or ``not name`` a line; ``#`` starts a comment. ``python`` names the
interpreter and ``nvcc`` the CUDA compiler; every other name is a Python distribution that the node
has, together with its own dependencies, except the ``not`` ones, which it lacks even where a
dependency's metadata would bring them (the node was not installed by one pip resolution).

The project's requirements are setup.py's ``install_requires`` and ``extras_require``, read from its
source (literal lists), so that the bundle and the installed package cannot disagree.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from typing import Dict, List, Tuple

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from megatron_conan.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INVENTORY = os.path.join(REPO, "benchmarks", "gpu_node_inventory.txt")
SETUP_PY = os.path.join(REPO, "setup.py")
TOOLS = ("python", "nvcc")
"""Inventory names that are programs, not distributions."""


@dataclasses.dataclass(frozen=True)
class NodeInventory:
    python: str
    """The node's interpreter version, e.g. "3.12.3": the bundle's wheels are for its minor version."""
    tools: Dict[str, str]
    """Programs the node has, by name (nvcc), with their versions."""
    requirements: Tuple[Requirement, ...]
    """The distributions the node has, each with the version it has (or any version)."""
    absent: Tuple[str, ...] = ()
    """Canonical names of distributions the node lacks (``not`` lines)."""

    @property
    def python_minor(self) -> str:
        """"3.12" of "3.12.3"."""
        return ".".join(self.python.split(".")[:2])

    @property
    def names(self) -> Tuple[str, ...]:
        """The distributions' canonical names."""
        return tuple(canonicalize_name(req.name) for req in self.requirements)

    def pip_requirements(self) -> List[str]:
        """Requirement strings pip can resolve on a package index: a local version label (torch's
        "+cu130") is dropped, since the index's build has none and == with a label matches only it."""
        return [f"{req.name}{_without_local_label(str(req.specifier))}" for req in self.requirements]

    def marker_environment(self) -> Dict[str, str]:
        """PEP 508 marker values of the node (CPython on x86-64 Linux), to follow dependencies as pip
        would there, whatever machine builds the bundle."""
        env = default_environment()
        env.update(python_version=self.python_minor, python_full_version=self.python, implementation_name="cpython",
                   implementation_version=self.python, platform_python_implementation="CPython",
                   sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
        return env


def _without_local_label(specifier: str) -> str:
    return ",".join(part.split("+", 1)[0] for part in specifier.split(",")) if specifier else ""


def read_inventory(path: str = INVENTORY) -> NodeInventory:
    """The inventory at `path`; a malformed line is an InputError naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise InputError(f"cannot read the node inventory {path}: {error.strerror}") from error
    found: Dict[str, Requirement] = {}
    absent: List[str] = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if text.startswith("not "):
            absent.append(canonicalize_name(text[4:].strip()))
            continue
        try:
            req = Requirement(text)
        except InvalidRequirement as error:
            raise InputError(f"{path}:{number}: not a requirement: {text!r} ({error})") from error
        name = canonicalize_name(req.name)
        if name in found:
            raise InputError(f"{path}:{number}: {req.name} is listed twice")
        found[name] = req
    tools = {name: _pinned_version(found.pop(name), path) for name in TOOLS if name in found}
    if "python" not in tools:
        raise InputError(f"{path}: no python==X.Y.Z line: the bundle's wheels are for the node's Python")
    both = sorted(set(absent) & set(found))
    if both:
        raise InputError(f"{path}: {', '.join(both)} listed as present and as `not` present")
    return NodeInventory(python=tools.pop("python"), tools=tools, requirements=tuple(found.values()),
                         absent=tuple(absent))


def _pinned_version(req: Requirement, path: str) -> str:
    specs = list(req.specifier)
    if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
        raise InputError(f"{path}: {req.name} needs one exact version (==X.Y), got {str(req.specifier)!r}")
    return specs[0].version


def project_requirements(setup_py: str = SETUP_PY) -> Tuple[List[str], Dict[str, List[str]]]:
    """setup.py's (install_requires, extras_require), read from the source without running it."""
    with open(setup_py, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), setup_py)
    keywords = {node.arg: node.value for node in ast.walk(tree)
                if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require")}
    if len(keywords) != 2:
        raise InputError(f"{setup_py}: no literal install_requires and extras_require in setup()")
    return ast.literal_eval(keywords["install_requires"]), ast.literal_eval(keywords["extras_require"])
