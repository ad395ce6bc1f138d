"""Issue 31: the bundle's rule (what the check loads that the node lacks, with dependencies, never
the node's own torch), its size limit and directory, and its offline install, on a made-up
resolution and hand-made wheels (no package index)."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from megatron_conan.errors import InputError
from megatron_conan.gpu_node import bundle
from megatron_conan.gpu_node.imports import CheckImports
from megatron_conan.gpu_node.inventory import NodeInventory
from packaging.requirements import Requirement

NODE = NodeInventory(python="3.12.3", tools={}, requirements=(Requirement("torch==2.11.0+cu130"),
                                                              Requirement("transformers==5.17.0")),
                     absent=("pydantic",))
GRAPH = bundle.DependencyGraph([
    bundle.Package("torch", "2.11.0", ("filelock", "typing-extensions>=4")),
    bundle.Package("filelock", "3", ()),
    bundle.Package("transformers", "5.17.0", ("huggingface-hub", "pydantic>=2; extra == 'serving'")),
    bundle.Package("huggingface-hub", "1", ("typer",)),
    bundle.Package("typer", "1", ("pydantic>=2",)),  # pip would bring pydantic; the node lacks it
    bundle.Package("pydantic", "2.14", ("pydantic-core==2.50", "annotated-types")),
    bundle.Package("pydantic-core", "2.50", ("typing-extensions",)),
    bundle.Package("typing-extensions", "4", ()),
    bundle.Package("annotated-types", "0.8", ("typing-extensions; python_version < '3.9'",)),
    bundle.Package("megatron-core", "0.16.1", ("torch", "numpy", "packaging")),
    bundle.Package("numpy", "2.5", ()),
    bundle.Package("packaging", "26", ()),
    bundle.Package("mteb", "2", ("datasets", "pydantic")),
    bundle.Package("datasets", "5", ("pyarrow",)),
    bundle.Package("pyarrow", "26", ()),
])
MODULES = {"megatron-core": {"megatron"}, "pydantic": {"pydantic"}, "mteb": {"mteb"}}
CHECK = CheckImports(required=("megatron.core", "pydantic", "torch"), optional=())


def _plan(requirements=("torch>=2.11", "megatron-core==0.16.1", "pydantic>=2.7", "mteb>=2.0"), modules=CHECK):
    return bundle.plan_bundle(NODE, GRAPH, list(requirements), modules, lambda package: MODULES[package.name])


def test_the_bundle_is_what_the_check_loads_and_the_node_lacks():
    plan = _plan()
    assert [package.name for package in plan.packages] == ["annotated-types", "megatron-core", "numpy", "packaging",
                                                           "pydantic", "pydantic-core"]
    assert {"torch", "transformers", "typer", "typing-extensions", "filelock"} <= plan.node_has
    assert "pydantic" not in plan.node_has  # the inventory's `not` line stops typer's dependency
    assert plan.left_out == {"mteb": "the GPU check loads none of its modules (mteb)"}


def test_without_the_checks_modules_every_missing_requirement_is_bundled():
    names = {package.name for package in _plan(modules=None).packages}
    assert {"mteb", "datasets", "pyarrow"} <= names and "torch" not in names


def test_a_requirement_outside_the_resolution_is_an_input_error():
    with pytest.raises(InputError, match="no-such is not in the resolution"):
        _plan(requirements=["no-such>=1"])


def _wheel(directory, name, version, module, payload=b""):
    """A minimal valid wheel of `module` (pip installs it offline)."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {f"{module}/__init__.py": b"VALUE = 1\n" + payload,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    path = os.path.join(directory, f"{dist}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        for name_in_zip, data in files.items():
            wheel.writestr(name_in_zip, data)
        wheel.writestr(f"{dist}.dist-info/RECORD", record)
    return path


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    """resolve/download answered from GRAPH and hand-made wheels: bundle.build_bundle without an index."""
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setattr(bundle, "resolve", lambda inventory, requirements, python: GRAPH)

    def download(inventory, packages, into, python):
        os.makedirs(into, exist_ok=True)
        for package in packages:
            payload = os.urandom(3 * 2**20) if package.name == "numpy" else b""  # incompressible: 3 MiB
            _wheel(into, package.name, package.version, next(iter(MODULES.get(package.name, {package.name.replace("-", "_")}))), payload)
        return {bundle.canonicalize_name(file.split("-", 1)[0]): os.path.join(into, file)
                for file in os.listdir(into)}

    monkeypatch.setattr(bundle, "download", download)


def test_build_writes_the_wheels_and_a_manifest_and_says_what_it_left_out(offline_pip, tmp_path):
    out = tmp_path / "gpu-bundle"
    manifest = bundle.build_bundle(str(out), NODE, ["megatron-core==0.16.1", "pydantic", "mteb"], CHECK)
    assert sorted(os.listdir(out)) == sorted([wheel["file"] for wheel in manifest["wheels"]] + ["MANIFEST.json"])
    assert json.loads((out / "MANIFEST.json").read_text()) == manifest
    assert manifest["python"] == "3.12" and manifest["left_out"] == {"mteb": "the GPU check loads none of its modules (mteb)"}
    lines = bundle.describe(manifest)
    assert lines[-1].endswith("total, 6 wheels for CPython 3.12 manylinux x86_64 (limit 40 MiB)")
    assert any("left out  mteb" in line for line in lines)
    again = bundle.build_bundle(str(out), NODE, ["megatron-core==0.16.1", "pydantic"], CHECK)  # its own: replaced
    assert again["left_out"] == {}


def test_over_the_limit_is_one_line_and_leaves_the_directory_alone(offline_pip, tmp_path):
    out = tmp_path / "gpu-bundle"
    with pytest.raises(InputError, match=r"^the bundle is 3\.0 MiB, over its 2 MiB: .*numpy-2\.5-py3-none-any\.whl 3\.0 MiB"):
        bundle.build_bundle(str(out), NODE, ["megatron-core==0.16.1"], CHECK, limit_mib=2)
    assert not out.exists()


def test_a_directory_it_did_not_make_is_not_touched(offline_pip, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="holds files this tool did not write"):
        bundle.build_bundle(str(out), NODE, ["pydantic"], CHECK)
    assert os.listdir(out) == ["notes.txt"]


def test_the_bundle_installs_offline_into_a_target_and_imports_from_there(tmp_path):
    wheels = tmp_path / "gpu-bundle"
    wheels.mkdir()
    file = os.path.basename(_wheel(str(wheels), "offline-probe", "1.0", "offline_probe"))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (wheels / "MANIFEST.json").write_text(json.dumps({"python": python, "left_out": {}, "total_bytes": 1,
                                                      "wheels": [{"file": file, "name": "offline-probe",
                                                                  "version": "1.0", "bytes": 1}]}))
    target = tmp_path / "target"
    assert bundle.install_bundle(str(wheels), str(target)) == [file]
    result = subprocess.run([sys.executable, "-c", "import offline_probe; print(offline_probe.VALUE)"],
                            env=dict(os.environ, PYTHONPATH=str(target)), capture_output=True, text=True)
    assert result.stdout.strip() == "1", result.stderr
    (wheels / "MANIFEST.json").write_text(json.dumps({"python": "2.7", "wheels": []}))
    with pytest.raises(InputError, match=f"is for Python 2.7, this is {python}"):
        bundle.install_bundle(str(wheels), str(tmp_path / "other"))


def test_a_wheels_top_level_modules_are_read_from_it(tmp_path):
    path = _wheel(str(tmp_path), "pytrec-eval-terrier", "0.5", "pytrec_eval")
    assert bundle.wheel_top_level(path) == {"pytrec_eval"}
