"""Issue 31, "a test runs the rehearsal's import check": every module the GPU check's code imports
must import with only the node's inventory plus the bundle installed. Here this environment is made
to look like the node: a module of any other distribution fails to import, as it would there. The
rule is the bundle's own (plan_bundle over this environment's metadata instead of pip's resolution);
the rehearsal runs the same check on a real venv of the node's versions (docs/GPU.md)."""

import pytest

from megatron_conan.gpu_node import bundle
from megatron_conan.gpu_node.imports import CheckImports, check_imports, run_import_check
from megatron_conan.gpu_node.inventory import project_requirements, read_inventory


@pytest.fixture(scope="module")
def node_and_bundle():
    inventory = read_inventory()
    graph = bundle.graph_from_environment()
    install_requires, _ = project_requirements()
    modules = check_imports()
    plan = bundle.plan_bundle(inventory, graph, install_requires, modules, bundle.environment_top_level)
    return plan, modules


def test_the_checks_imports_are_read_from_its_source():
    modules = check_imports()
    assert {"torch", "triton", "megatron", "pydantic", "sentence_transformers", "pytrec_eval", "bm25s"} <= set(
        modules.top_level)
    assert "mteb" not in modules.top_level  # the check evaluates with pytrec_eval, not MTEB's runner
    assert {"transformer_engine", "wandb"} <= set(modules.optional)  # used where installed, never required


def test_the_bundle_holds_what_the_node_lacks_and_never_its_torch(node_and_bundle):
    plan, _ = node_and_bundle
    names = {package.name for package in plan.packages}
    assert {"megatron-core", "pydantic", "pydantic-core", "annotated-types", "pytrec-eval-terrier", "bm25s"} <= names
    assert not names & {"torch", "triton", "transformers", "sentence-transformers", "numpy", "tokenizers"}
    assert set(plan.left_out) == {"mteb"}


@pytest.mark.slow
def test_every_module_the_check_loads_imports_on_the_node_plus_the_bundle(node_and_bundle):
    plan, modules = node_and_bundle
    allowed = plan.node_has | {package.name for package in plan.packages}
    assert run_import_check(modules, only=allowed) == {}


def test_the_simulated_node_without_the_bundle_lacks_what_the_issue_says(node_and_bundle):
    """The control: the same check with the bundle's distributions withheld fails where the node
    would (so the test above can fail)."""
    plan, _ = node_and_bundle
    failed = run_import_check(CheckImports(required=("pydantic", "megatron.core", "sentencepiece"), optional=()),
                              only=plan.node_has)
    assert set(failed) == {"pydantic", "megatron.core"}
    assert "No module named 'pydantic'" in failed["pydantic"]
