"""The offline wheel bundle: what the GPU node lacks of what the GPU check loads, as binary wheels
for the node's CPython on manylinux x86-64, in ``gpu-bundle/`` (docs/GPU.md).

The rule, in :func:`plan_bundle`:
  1. pip resolves the node inventory (its pins) together with setup.py's ``install_requires`` for
     the node's Python and platform (a dry run: nothing is installed, only metadata is fetched);
  2. the node has its inventory and everything those distributions depend on, less what the
     inventory says it lacks (``not`` lines);
  3. of the project's requirements the node lacks, the bundle's roots are those providing a module
     the check's code imports (:mod:`megatron_conan.gpu_node.imports`); the others are left out and
     named (mteb: the check evaluates with pytrec_eval and loads no MTEB code);
  4. the bundle is the roots with their dependencies, less what the node has: so it never holds
     torch, triton, transformers or sentence-transformers, and the list cannot drift from either file.

Layout of ``gpu-bundle/``: the wheels, and ``MANIFEST.json`` written last ({"python": "3.12",
"wheels": [{"file", "name", "version", "bytes"}], "total_bytes", "left_out": {name: why}}). The
check installs exactly the manifest's wheels; a directory holding files no manifest lists is not
touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from megatron_conan import atomic_write
from megatron_conan.errors import InputError
from megatron_conan.gpu_node.imports import CheckImports
from megatron_conan.gpu_node.inventory import NodeInventory

LIMIT_MIB = 40
MANIFEST = "MANIFEST.json"
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(17, 29)) + ("manylinux2014_x86_64",)
"""glibc 2.17-2.28 wheels: pip takes --platform literally, so each manylinux level is named."""


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    """Canonical distribution name."""
    version: str
    requires: tuple
    """Its Requires-Dist strings, markers included."""


class DependencyGraph:
    """Resolved distributions by canonical name, from a pip report or from this environment."""

    def __init__(self, packages: Iterable[Package]):
        self.packages: Dict[str, Package] = {package.name: package for package in packages}

    def closure(self, roots: Iterable[Requirement], env: Dict[str, str], exclude: Iterable[str] = ()) -> Set[str]:
        """Canonical names of `roots` and everything they need where markers are evaluated in `env`
        (a root's extras included), limited to the resolved distributions, never entering `exclude`."""
        found: Set[str] = set()
        exclude = set(exclude)
        todo = [(root, frozenset(root.extras)) for root in roots]
        while todo:
            req, extras = todo.pop()
            name = canonicalize_name(req.name)
            if name in found or name in exclude or name not in self.packages:
                continue
            found.add(name)
            for text in self.packages[name].requires:
                dependency = Requirement(text)
                if dependency.marker is None or any(dependency.marker.evaluate(dict(env, extra=extra))
                                                    for extra in ("", *extras)):
                    todo.append((dependency, frozenset(dependency.extras)))
        return found


def graph_from_pip_report(report: Dict) -> DependencyGraph:
    return DependencyGraph(Package(canonicalize_name(item["metadata"]["name"]), item["metadata"]["version"],
                                   tuple(item["metadata"].get("requires_dist", ())))
                           for item in report["install"])


def graph_from_environment() -> DependencyGraph:
    """This environment's installed distributions (tests: the same rule without a package index)."""
    return DependencyGraph(Package(canonicalize_name(dist.metadata["Name"]), dist.version, tuple(dist.requires or ()))
                           for dist in metadata.distributions())


def pip_target_options(inventory: NodeInventory) -> List[str]:
    """pip options choosing binary wheels for the node (CPython of its version, x86-64 manylinux)."""
    tag = inventory.python_minor.replace(".", "")
    options = ["--only-binary=:all:", "--python-version", inventory.python_minor, "--implementation", "cp",
               "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def _pip(arguments: List[str], python: str = sys.executable) -> None:
    result = subprocess.run([python, "-m", "pip", *arguments, "--disable-pip-version-check", "--quiet"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.splitlines()
        # a conflict's cause ("The user requested X==1", "Y 2 depends on X>=2") says more than its last line
        cause = [line.strip() for line in lines if "The user requested" in line or " depends on " in line]
        errors = [line.strip() for line in lines if line.startswith("ERROR")] or lines or ["(no output)"]
        raise InputError(f"pip {arguments[0]} failed: " + ("; ".join(cause) if cause else errors[-1]))


def resolve(inventory: NodeInventory, requirements: Sequence[str], python: str = sys.executable) -> DependencyGraph:
    """pip's resolution of the node's pins with `requirements` for the node's Python (metadata only)."""
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_resolve_") as scratch:
        report_path = os.path.join(scratch, "report.json")
        _pip(["install", "--dry-run", "--ignore-installed", "--report", report_path,
              "--target", os.path.join(scratch, "target"), *pip_target_options(inventory),
              *inventory.pip_requirements(), *requirements], python)
        with open(report_path, encoding="utf-8") as handle:
            return graph_from_pip_report(json.load(handle))


@dataclasses.dataclass(frozen=True)
class BundlePlan:
    packages: tuple
    """The Packages to bundle, by name."""
    left_out: Dict[str, str]
    """Project requirements the node lacks and the bundle leaves out, with the reason."""
    node_has: frozenset


def node_closure(inventory: NodeInventory, graph: DependencyGraph) -> Set[str]:
    """What the node has: its inventory with their dependencies, less the distributions it lacks."""
    return graph.closure(inventory.requirements, inventory.marker_environment(), exclude=inventory.absent)


def plan_bundle(inventory: NodeInventory, graph: DependencyGraph, requirements: Sequence[str],
                modules: Optional[CheckImports], provides: Callable[[Package], Set[str]]) -> BundlePlan:
    """What the bundle holds (see the module docstring). `modules`: the check's imports, whose
    top-level names pick the roots (None: every requirement the node lacks, as for the test suite);
    `provides(package)`: the top-level module names a distribution installs."""
    env = inventory.marker_environment()
    node_has = node_closure(inventory, graph)
    roots, left_out = [], {}
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name in node_has or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        if name not in graph.packages:
            raise InputError(f"{req.name} is not in the resolution: cannot tell what it needs")
        if modules is None or provides(graph.packages[name]) & set(modules.top_level):
            roots.append(req)
        else:
            left_out[name] = ("the GPU check loads none of its modules ("
                              + ", ".join(sorted(provides(graph.packages[name]))) + ")")
    names = graph.closure(roots, env) - node_has
    replaced = names & set(inventory.names)
    if replaced:  # cannot happen by the rule above; a bundle that replaced the node's torch would be wrong
        raise InputError(f"the bundle would replace the node's {', '.join(sorted(replaced))}")
    return BundlePlan(packages=tuple(graph.packages[name] for name in sorted(names)), left_out=left_out,
                      node_has=frozenset(node_has))


def wheel_top_level(path: str) -> Set[str]:
    """Top-level importable names in a wheel (its directories and modules, less metadata)."""
    with zipfile.ZipFile(path) as wheel:
        tops = {entry.split("/", 1)[0] for entry in wheel.namelist()}
    return {top[:-3] if top.endswith(".py") else top.split(".", 1)[0] for top in tops
            if not top.endswith((".dist-info", ".data")) and (top.endswith(".py") or "." not in top or top.endswith(".so"))}


def environment_top_level(package: Package) -> Set[str]:
    """Top-level importable names an installed distribution provides."""
    files = metadata.distribution(package.name).files or ()
    return {str(path).split("/", 1)[0].removesuffix(".py").split(".", 1)[0] for path in files
            if not str(path).split("/", 1)[0].endswith((".dist-info", ".data", ".pth")) and "__pycache__" not in str(path)
            and not str(path).startswith("..")}


def download(inventory: NodeInventory, packages: Sequence[Package], into: str, python: str = sys.executable) -> Dict[str, str]:
    """{canonical name: wheel path} of `packages` at their versions, for the node, without dependencies."""
    if packages:
        _pip(["download", "--no-deps", "--dest", into, *pip_target_options(inventory),
              *(f"{package.name}=={package.version}" for package in packages)], python)
    found = {}
    for file in os.listdir(into):
        if file.endswith(".whl"):
            found[canonicalize_name(file.split("-", 1)[0])] = os.path.join(into, file)
    missing = [package.name for package in packages if package.name not in found]
    if missing:
        raise InputError(f"pip downloaded no wheel for {', '.join(missing)}")
    return found


def build_bundle(out_dir: str, inventory: NodeInventory, requirements: Sequence[str], modules: Optional[CheckImports],
                 python: str = sys.executable, limit_mib: Optional[float] = LIMIT_MIB) -> Dict:
    """Resolve, plan and download the bundle into `out_dir` (replaced only where this tool made it);
    its manifest. Over `limit_mib` it is an InputError and `out_dir` is left as it was."""
    check_ours(out_dir)
    graph = resolve(inventory, requirements, python)
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_") as scratch:
        candidates = os.path.join(scratch, "candidates")
        node_has = node_closure(inventory, graph)
        lacking = [graph.packages[name] for name in sorted({canonicalize_name(Requirement(text).name)
                                                            for text in requirements} - node_has)
                   if name in graph.packages]
        wheels = download(inventory, lacking, candidates, python)  # roots: to read the modules they provide
        plan = plan_bundle(inventory, graph, requirements, modules, lambda package: wheel_top_level(wheels[package.name]))
        wheels.update(download(inventory, [p for p in plan.packages if p.name not in wheels], candidates, python))
        chosen = [wheels[package.name] for package in plan.packages]
        manifest = {"python": inventory.python_minor, "left_out": plan.left_out,
                    "wheels": [{"file": os.path.basename(path), "name": package.name, "version": package.version,
                                "bytes": os.path.getsize(path)} for package, path in zip(plan.packages, chosen)]}
        manifest["total_bytes"] = sum(wheel["bytes"] for wheel in manifest["wheels"])
        if limit_mib is not None and manifest["total_bytes"] > limit_mib * 2**20:
            raise InputError(f"the bundle is {manifest['total_bytes'] / 2**20:.1f} MiB, over its {limit_mib:g} MiB: "
                             + ", ".join(f"{w['file']} {w['bytes'] / 2**20:.1f} MiB" for w in manifest["wheels"]))
        with atomic_write.directory(out_dir, overwrite=os.path.isdir(out_dir)) as tmp:
            for path in chosen:
                shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=2)
                handle.write("\n")
    return manifest


def check_ours(out_dir: str) -> None:
    """An InputError unless `out_dir` is absent, empty, or a bundle this tool wrote (its manifest's
    wheels and nothing else): a rebuild replaces only that."""
    if not os.path.isdir(out_dir):
        if os.path.lexists(out_dir):
            raise InputError(f"{out_dir} exists and is not a directory")
        return
    present = set(os.listdir(out_dir))
    if not present:
        return
    try:
        ours = {wheel["file"] for wheel in read_manifest(out_dir)["wheels"]} | {MANIFEST}
    except InputError:
        ours = set()
    strangers = sorted(present - ours)
    if strangers:
        raise InputError(f"{out_dir} holds files this tool did not write ({', '.join(strangers[:3])}): "
                         "name an empty or new directory")


def read_manifest(bundle_dir: str) -> Dict:
    path = os.path.join(bundle_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise InputError(f"no readable bundle manifest {path}: run `make gpu-bundle` where there is network") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("wheels"), list):
        raise InputError(f"{path} is not a bundle manifest")
    return manifest


def site_dir(parent: str) -> str:
    """Where wheels are installed under `parent`: a directory named site-packages. dill (which
    `datasets` fingerprints every Dataset with) pickles by value any module whose file path holds
    neither a sys prefix nor "site-packages", and dies on pyarrow's Cython types; a `--target`
    overlay named otherwise breaks `Dataset.from_dict` (seen in the rehearsal's suite run)."""
    return os.path.join(parent, "site-packages")


def install_bundle(bundle_dir: str, target: str, python: str = sys.executable) -> List[str]:
    """Install the manifest's wheels into `target` exactly as on the node: no index, no dependencies,
    nothing system-wide. The wheel files installed."""
    manifest = read_manifest(bundle_dir)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python == sys.executable and manifest.get("python") != running:
        raise InputError(f"the bundle in {bundle_dir} is for Python {manifest.get('python')}, this is {running}")
    files = [os.path.join(bundle_dir, wheel["file"]) for wheel in manifest["wheels"]]
    if files:
        _pip(["install", "--no-index", "--no-deps", "--no-compile", "--target", target, *files], python)
    return [os.path.basename(path) for path in files]


def describe(manifest: Dict) -> List[str]:
    """The lines `make gpu-bundle` prints: each wheel, what was left out and why, the total."""
    lines = [f"{wheel['bytes'] / 2**20:7.2f} MiB  {wheel['file']}" for wheel in manifest["wheels"]]
    lines += [f"   left out  {name}: {why}" for name, why in sorted(manifest["left_out"].items())]
    lines.append(f"{manifest['total_bytes'] / 2**20:7.2f} MiB  total, {len(manifest['wheels'])} wheels "
                 f"for CPython {manifest['python']} manylinux x86_64 (limit {LIMIT_MIB} MiB)")
    return lines
