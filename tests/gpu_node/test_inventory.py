"""Issue 31: the GPU node's declared inventory parses, and the package's runtime floor (setup.py)
is what that node has: torch 2.11, transformers 5.17, sentence-transformers 6.0, triton 3.6."""

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from megatron_conan.errors import InputError
from megatron_conan.gpu_node.inventory import project_requirements, read_inventory


def test_the_repository_inventory_is_the_node_of_the_issue():
    inventory = read_inventory()
    assert inventory.python == "3.12.3" and inventory.python_minor == "3.12"
    assert inventory.tools == {"nvcc": "13.0"}
    pins = {canonicalize_name(req.name): str(req.specifier) for req in inventory.requirements}
    assert pins["torch"] == "==2.11.0+cu130" and pins["triton"] == "==3.6.0"
    assert pins["transformers"] == "==5.17.0" and pins["sentence-transformers"] == "==6.0.1"
    assert "torch==2.11.0" in inventory.pip_requirements()  # the index's build has no local label
    assert {"megatron-core", "pydantic", "pydantic-core", "annotated-types", "mteb", "pytrec-eval-terrier",
            "bm25s", "zstandard", "transformer-engine", "apex"} == set(inventory.absent)
    assert inventory.marker_environment()["python_version"] == "3.12"


def test_setup_py_floors_are_the_nodes_versions():
    """Every requirement of setup.py (install_requires and the dev / triton extras) accepts the version
    the node has, and the floors of the four the node pins are exactly its versions (what the
    rehearsal proves), so neither file can move without the other."""
    install_requires, extras = project_requirements()
    node = {canonicalize_name(req.name): req for req in read_inventory().requirements}
    floors = {}
    for text in install_requires + extras["dev"] + extras["triton"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name in node and node[name].specifier:
            version = next(iter(node[name].specifier)).version.split("+")[0]
            assert req.specifier.contains(version), (text, version)
            floors.update({name: [spec.version for spec in req.specifier if spec.operator == ">="]} if
                          any(spec.operator == ">=" for spec in req.specifier) else {})
    assert floors == {"torch": ["2.11"], "transformers": ["5.17"], "sentence-transformers": ["6.0"],
                      "triton": ["3.6"]}


@pytest.mark.parametrize("text,problem", [
    ("python==3.12.3\ntorch==2.11.0\ntorch\n", "torch is listed twice"),
    ("torch==2.11.0\n", "no python==X.Y.Z line"),
    ("python==3.12.3\nnot pydantic\npydantic\n", "pydantic listed as present and as `not` present"),
    ("python==3.12.3\ntorch>>2\n", ":2: not a requirement"),
    ("python>=3.12\n", "python needs one exact version"),
])
def test_a_bad_inventory_is_one_line_naming_it(tmp_path, text, problem):
    path = tmp_path / "inventory.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        read_inventory(str(path))
