"""Shared fixtures of the embedding-stage tests: a tokenizer and contrastive stores (seconds, offline)."""

import dataclasses
import json
import os
import signal

import pytest
import torch


def read_metrics(run_dir):
    """{step: record} of a run's metrics.jsonl (the last line of a step wins, as after a resume)."""
    by_step = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                record = json.loads(line)
                by_step[record["step"]] = record
    return by_step


def assert_same_step(result, reference, tol=1e-5):
    """Two steps agree: the loss, and each gradient, within `tol` of its size. fp32: other batch
    shapes, reduction orders and thread counts (a one-rank world gets every core, so its matmuls
    split their sums differently) round differently, up to some tens of ulps (seen: 1.1e-6 of the
    size in CI); a wrong gradient is off by orders of magnitude more."""
    assert abs(result["loss"] - reference["loss"]) < tol * max(1.0, abs(reference["loss"])), (
        result["loss"], reference["loss"])
    assert set(result["grads"]) == set(reference["grads"])
    for name, expected in reference["grads"].items():
        error = float((result["grads"][name] - expected).abs().max())
        assert error <= tol * max(1.0, float(expected.abs().max())), (name, error)


def kill_group(process):
    """SIGKILL a run started with start_new_session=True together with its helpers (megatron-core's
    checkpoint writer), and reap it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def communicate_or_kill(process, timeout):
    """`process.communicate(timeout=...)`, but a run that overstays, or a test interrupted while
    waiting, kills the run: in its own session nothing else would, and an orphaned training run
    keeps loading the cores for every test after it (a later subset then times out)."""
    try:
        return process.communicate(timeout=timeout)
    except BaseException:
        kill_group(process)
        raise


@pytest.fixture(scope="session")
def embedding_data(tmp_path_factory):
    """A 512-piece tokenizer and a store of `pair` examples (synthetic multilingual text); the
    golden runs' recipe (tests/golden/goldens.py), so their losses hold on these files."""
    from tests.golden import goldens

    directory = tmp_path_factory.mktemp("embedding_data")
    tokenizer = goldens.build_tokenizer(directory)
    return {"dir": directory, "tokenizer": tokenizer, "pairs": goldens.build_pairs(directory, tokenizer)}


@pytest.fixture(scope="session")
def supervised_store(embedding_data):
    """A store of the four stage-4 tasks (retrieval / clr with negatives and candidate pools,
    classification, sts), with the embedding_data tokenizer."""
    from tests.golden import goldens

    return goldens.build_supervised(embedding_data["dir"], embedding_data["tokenizer"])


class Recorded:
    """An embedding loss that records, in `captured`, the embeddings by role it was handed, the loss
    and the stats it returned (all detached), then returns them."""

    def __init__(self, loss, captured):
        self.loss, self.captured = loss, captured

    def __call__(self, embeddings, targets):
        loss, stats = self.loss(embeddings, targets)
        self.captured.append({
            "embeddings": {role: value.detach().clone() for role, value in embeddings.items()},
            "loss": float(loss),
            "stats": {name: value.detach().clone() if torch.is_tensor(value) else value
                      for name, value in stats.items()}})
        return loss, stats


class CapturingStage:
    """Mixin for an embedding stage: records what each step's loss saw, so a test can recompute
    the loss independently of losses/. `captured[-1]` holds the embeddings by role handed to the
    loss (the cached ones under GradCache; hard negatives as [b, k, h]) and the (loss, stats) it
    returned, all detached."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured = []

    def run_contrastive(self, ctx, roles, loss, targets):
        # the step's wrapper (plain or GradCache) around a recording of the loss it wraps
        recorded = dataclasses.replace(loss, loss=Recorded(loss.loss, self.captured))
        return super().run_contrastive(ctx, roles, recorded, targets)
