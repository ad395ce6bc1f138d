"""The embedding step's loss is composed explicitly, as objects, from the task table and the config:
no closures or partials assemble it, and the gather it collects candidates with is an object it is
built with, not module state."""

import ast
import os

import pytest
import torch

from megatron_conan import tasks
from megatron_conan.config.run import EmbeddingSection
from megatron_conan.data.contrastive import ContrastiveBatch, pad_sequences
from megatron_conan.losses.cosent import CoSENTLoss
from megatron_conan.losses.gather import GroupGather
from megatron_conan.losses.infonce import InfoNCELoss
from megatron_conan.losses.matryoshka import MatryoshkaLoss
from megatron_conan.training.contrastive_step import FullBatch, GradCache
from megatron_conan.training.embedding_loss import LOSS_BUILDERS, compose_loss, loss_keys

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "megatron_conan")
COMPOSING = ("losses/infonce.py", "losses/cosent.py", "losses/matryoshka.py", "losses/gather.py",
             "losses/targets.py", "training/contrastive_step.py", "training/embedding_loss.py",
             "training/embedding_stage.py")


def test_every_task_has_a_loss_builder():
    assert {task.loss.name for task in tasks.TASKS} <= set(LOSS_BUILDERS)


def test_the_composition_of_each_task():
    gather = GroupGather()
    section = EmbeddingSection(temperature=0.05, cosent_scale=10.0, symmetric=True, matryoshka_dims=[16, 32],
                               matryoshka_weights={16: 0.5}, mini_batch_size=4)
    retrieval = compose_loss(tasks.task("retrieval"), section, gather)
    assert isinstance(retrieval, GradCache) and retrieval.mini_batch_size == 4
    assert isinstance(retrieval.loss, MatryoshkaLoss) and list(retrieval.loss.dims) == [16, 32]
    assert retrieval.loss.weights == {16: 0.5}
    assert retrieval.loss.loss == InfoNCELoss(temperature=0.05, gather=gather, in_batch_negatives=True,
                                              symmetric=False)  # symmetric is the pair task's option only
    pair = compose_loss(tasks.task("pair"), section, gather).loss.loss
    assert pair.symmetric and pair.gather is gather
    classification = compose_loss(tasks.task("classification"), section, gather).loss.loss
    assert not classification.in_batch_negatives
    plain = EmbeddingSection(cosent_scale=10.0)
    sts = compose_loss(tasks.task("sts"), plain, gather)
    assert isinstance(sts, FullBatch) and sts.loss == CoSENTLoss(scale=10.0)  # no dims: no Matryoshka wrapper


def _batch(negatives):
    ids, lengths = pad_sequences([[5, 6], [7], [5, 6]], 0)
    batch = ContrastiveBatch("retrieval", torch.arange(3), ids, lengths, ids.clone(), lengths.clone())
    if negatives:
        batch.negative_ids, batch.negative_lengths = pad_sequences([[5, 6], [9]] * 3, 0)
        batch.negative_mask = torch.ones(3, 2, dtype=torch.bool)
    return batch


@pytest.mark.parametrize("name, symmetric, expected", [
    ("retrieval", False, {"positive_keys", "negative_keys"}),
    ("pair", True, {"positive_keys", "query_keys"}),
    ("pair", False, {"positive_keys"}),
    ("classification", False, set()),
    ("sts", False, set()),
])
def test_content_keys_follow_the_loss(name, symmetric, expected):
    keys = loss_keys(tasks.task(name), _batch(negatives=name == "retrieval"), EmbeddingSection(symmetric=symmetric))
    assert set(keys) == expected
    if "positive_keys" in keys:
        assert keys["positive_keys"][0] == keys["positive_keys"][2] != keys["positive_keys"][1]  # equal texts
    if "negative_keys" in keys:
        assert keys["negative_keys"].shape == (3, 2) and keys["negative_keys"][0, 0] == keys["positive_keys"][0]
    assert loss_keys(tasks.task(name), _batch(negatives=False), EmbeddingSection(mask_duplicate_positives=False)) == {}


def _tree(relative):
    with open(os.path.join(PACKAGE, relative), encoding="utf-8") as handle:
        return ast.parse(handle.read())


def test_no_lambda_or_partial_assembles_the_loss():
    found = []
    for relative in COMPOSING:
        for node in ast.walk(_tree(relative)):
            if isinstance(node, ast.Lambda):
                found.append(f"{relative}:{node.lineno} lambda")
            elif isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", "")) == "partial":
                found.append(f"{relative}:{node.lineno} partial")
    assert not found, found


def test_the_gather_module_holds_no_mutable_state():
    """Module level: imports, functions, classes, and names bound to immutable constants only."""
    mutable = []
    for node in _tree("losses/gather.py").body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            if not (isinstance(value, ast.Constant) or isinstance(value, ast.Tuple)
                    and all(isinstance(item, ast.Constant) for item in value.elts)):
                mutable.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif not isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Expr)):
            mutable.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not mutable, mutable
