"""Stage 4 (embed-sup) on batches built here: each task's loss equals a float64 reference written out
in this file (independent of losses/), every task trains, GradCache (2 and 4 chunks) equals the plain
step in loss, gradients and DHNM decisions at DP=1 and DP=2, GradCache's replay sees the dropout
mask of its cached pass, and DHNM replaces exactly the slot whose score says so, on the rank that
owns the example, with the next unused candidate."""

import dataclasses
import math

import numpy
import pytest
import torch
import torch.nn.functional as F

from megatron_conan.testing.distributed import run_distributed
from megatron_conan.training.embedding_stage import SupervisedStage
from tests.training.conftest import CapturingStage, assert_same_step

GLOBAL_BATCH = 8
K = 2  # hard-negative slots
TEMPERATURE = 0.05
COSENT_SCALE = 20.0
MATRYOSHKA = {16: 0.5, 32: 1.0, 64: 1.0}
"""dim -> weight of the run below (64: the tiny model's full width, always included)."""
POOL_SIZE = 5
EXAMPLE_IDS = [5, 2, 7, 4, 1, 3, 6, 0]
"""Row -> example id: at DP=2 rank 0 holds examples 5, 2, 7, 4, and example 5 is owned by rank 1."""
ACTIVE_DHNM = {"min_first_score": 0.95, "drop_ratio": 1.2, "max_score": 0.7}
"""Eq. 6 thresholds under which the untrained tiny model's scores replace some slots."""
CHUNKS = (1, 2, 4)
"""Forwards per role: 1 is the plain step, 2 and 4 GradCache."""


class FedStage(CapturingStage, SupervisedStage):
    """Stage 4 fed by the test (step_on_batch) instead of a store and a tokenizer."""

    def check_inputs(self, cfg, model_config):
        pass

    def setup(self, ctx):
        pass


class ChunkedForwardStage(FedStage):
    """GradCache's first pass with the activations kept: the same chunks in the same order draw the
    same dropout masks, so this gradient is what GradCache must give when its replay restores the
    RNG state of each chunk."""

    def run_contrastive(self, ctx, roles, loss, targets):
        from megatron_conan.training.contrastive_step import (GradCache, RoleEmbedder, _embed_role, as_loss_input,
                                                              by_length)
        from tests.training.conftest import Recorded

        chunking = GradCache(loss.loss, mini_batch_size=ctx.cfg.embedding.mini_batch_size)
        embedder = RoleEmbedder(ctx.chunks[0], ctx.cfg.embedding.pooling, ctx.model_config.hidden_size)
        embeddings = {}
        for role, sequences in roles.items():
            order = by_length(sequences)  # GradCache's chunks, in its order
            in_order = _embed_role(embedder, sequences.select(order), chunking.chunks(sequences.select(order)))
            embeddings[role] = torch.zeros_like(in_order).index_copy(0, order, in_order)
        loss, stats = Recorded(loss.loss, self.captured)(as_loss_input(roles, embeddings), targets)
        loss.backward()
        return loss.detach(), stats


def _cfg(run_dir, **model):
    from megatron_conan.config.loader import from_dict
    from megatron_conan.config.run import EmbeddingConfig

    return from_dict(EmbeddingConfig, {
        "run_dir": str(run_dir), "model": {"recipe": "tiny", **model},
        "train": {"train_steps": 4, "global_batch_size": GLOBAL_BATCH, "eval_interval": 0},
        "data": {"kind": "contrastive", "contrastive_prefix": "unused-fed-by-the-test"},
        "embedding": {"temperature": TEMPERATURE, "num_negatives": K, "cosent_scale": COSENT_SCALE,
                      "matryoshka_dims": [16, 32], "matryoshka_weights": {16: 0.5}}})


# -- the batches ---------------------------------------------------------------------------------

def _texts(generator, count, shortest=3, longest=12):
    lengths = torch.randint(shortest, longest + 1, (count,), generator=generator)
    return [torch.randint(4, 512, (int(n),), generator=generator).tolist() for n in lengths]


def _batch(task, queries, positives, negatives=None, mask=None, scores=None):
    from megatron_conan.data.contrastive import ContrastiveBatch, pad_sequences

    batch = ContrastiveBatch(task, torch.tensor(EXAMPLE_IDS), *pad_sequences(queries, 0), *pad_sequences(positives, 0))
    if negatives is not None:
        batch.negative_ids, batch.negative_lengths = pad_sequences([text for row in negatives for text in row], 0)
        batch.negative_mask = torch.tensor(mask)
        if task != "classification":
            batch.negative_pool_positions = torch.where(batch.negative_mask, torch.arange(K), -1)  # [B, K]
    if scores is not None:
        batch.scores = torch.tensor(scores, dtype=torch.float32)
    return batch


def retrieval_batch(task="retrieval", seed=1):
    """Hard negatives with every case of the content-key rule: a duplicate positive across the DP
    ranks (rows 1 and 5), a hub negative mined for three rows that is a copy of query 2 (so it
    weighs in query 2's denominator), a negative that is another row's positive (row 4 holds
    positive 7), and two padding slots that hold their own query's text (cosine 1 if scored)."""
    generator = torch.Generator().manual_seed(seed)
    queries, positives = _texts(generator, GLOBAL_BATCH), _texts(generator, GLOBAL_BATCH, 5, 16)
    negatives = [_texts(generator, K, 5, 16) for _ in range(GLOBAL_BATCH)]
    mask = [[True] * K for _ in range(GLOBAL_BATCH)]
    positives[5] = list(positives[1])
    negatives[0][0], negatives[3][1], negatives[6][0] = list(queries[2]), list(queries[2]), list(queries[2])
    negatives[4][1] = list(positives[7])
    for row in (1, 6):
        mask[row][1] = False
        negatives[row][1] = list(queries[row])
    return _batch(task, queries, positives, negatives, mask)


def classification_batch():
    """Texts against label texts: the own label, the other two labels as negatives (one of them a
    padding slot in rows 3 and 7)."""
    generator = torch.Generator().manual_seed(3)
    labels, queries = _texts(generator, 3, 2, 5), _texts(generator, GLOBAL_BATCH)
    positives = [labels[row % 3] for row in range(GLOBAL_BATCH)]
    negatives = [[labels[(row + 1) % 3], labels[(row + 2) % 3]] for row in range(GLOBAL_BATCH)]
    mask = [[True, row % 4 != 3] for row in range(GLOBAL_BATCH)]
    return _batch("classification", queries, positives, negatives, mask)


def sts_batch():
    """Pairs with gold scores (a tie, which orders no pair); pair 3 is two copies of one text."""
    generator = torch.Generator().manual_seed(4)
    queries, positives = _texts(generator, GLOBAL_BATCH), _texts(generator, GLOBAL_BATCH)
    positives[3] = list(queries[3])
    return _batch("sts", queries, positives, scores=[0.0, 1.0, 2.5, 5.0, 4.0, 3.0, 2.5, 0.5])


def alignment_batch():
    """Every valid negative is a copy of its own query (score 1), except slot 0 of row 0 (example
    5) and the padding slot of row 6: both hold other texts, and only the valid one may move."""
    generator = torch.Generator().manual_seed(9)
    queries, positives = _texts(generator, GLOBAL_BATCH), _texts(generator, GLOBAL_BATCH, 5, 16)
    negatives = [[list(queries[row]) for _ in range(K)] for row in range(GLOBAL_BATCH)]
    mask = [[True] * K for _ in range(GLOBAL_BATCH)]
    negatives[0][0] = _texts(generator, 1, 5, 16)[0]
    negatives[6][1], mask[6][1] = _texts(generator, 1, 5, 16)[0], False
    return _batch("retrieval", queries, positives, negatives, mask)


TASK_BATCHES = {"retrieval": retrieval_batch, "clr": lambda: retrieval_batch("clr", seed=2),
                "classification": classification_batch, "sts": sts_batch}


def _shard(batch, rank, world_size):
    """Rank `rank`'s contiguous rows of the global batch (the loader's split)."""
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    flat = slice(rows.start * K, rows.stop * K)
    fields = {"example_ids": rows, "query_ids": rows, "query_lengths": rows, "positive_ids": rows,
              "positive_lengths": rows, "negative_ids": flat, "negative_lengths": flat, "negative_mask": rows,
              "negative_pool_positions": rows, "scores": rows}
    return dataclasses.replace(batch, **{name: getattr(batch, name)[where] for name, where in fields.items()
                                         if getattr(batch, name) is not None})


# -- the runs ------------------------------------------------------------------------------------

def _fresh_dhnm(ctx, min_first_score=ACTIVE_DHNM["min_first_score"]):
    from megatron_conan.config.run import DHNMConfig
    from megatron_conan.data.dhnm import DHNMState

    thresholds = {**ACTIVE_DHNM, "min_first_score": min_first_score}
    return DHNMState([POOL_SIZE] * GLOBAL_BATCH, K, DHNMConfig(**thresholds),
                     dp_rank=ctx.data_parallel_rank, dp_size=ctx.data_parallel_size,
                     group=ctx.data_parallel_group, placement=ctx.placement)


def _step(stage, trainer, batch):
    """One step on this rank's batch from zeroed gradients: what the loss saw, and what came out."""
    from megatron_conan.models.sharding import gather_full_state_dict
    from megatron_conan.training.megatron_step import zero_grads

    ctx = trainer.ctx
    zero_grads(ctx.chunks, trainer.optimizer)
    output = stage.step_on_batch(ctx, 0, batch)
    grads = gather_full_state_dict(ctx.chunks, ctx.model_config, source="grad")  # collective
    captured = stage.captured[-1]
    return {"loss": output.loss, "rank_loss": captured["loss"], "embeddings": captured["embeddings"],
            "hard_negative_cosines": captured["stats"].get("hard_negative_cosines"), "metrics": output.metrics,
            "grads": grads if ctx.data_parallel_rank == 0 else None,
            "dhnm": stage.dhnm.state_dict() if stage.dhnm is not None else None}


def _tasks_body(rank, world_size, run_dir):
    from megatron_conan.training.trainer import Trainer

    cfg = _cfg(run_dir)
    stage = FedStage()
    trainer = Trainer(cfg, stage)
    ctx = trainer.ctx
    results = {}
    # one trainer, the four tasks in turn: a mixed run
    for task, make_batch in TASK_BATCHES.items():
        local = _shard(make_batch(), ctx.data_parallel_rank, ctx.data_parallel_size)
        for chunks in CHUNKS:
            cfg.embedding.mini_batch_size = 0 if chunks == 1 else len(local.example_ids) // chunks
            stage.dhnm = _fresh_dhnm(ctx) if task in ("retrieval", "clr") else None
            results[task, chunks] = _step(stage, trainer, local)
    cfg.embedding.mini_batch_size = 0
    stage.dhnm = _fresh_dhnm(ctx, min_first_score=0.999)  # replace every slot that scores below 0.999
    results["alignment"] = _step(stage, trainer, _shard(alignment_batch(), ctx.data_parallel_rank,
                                                        ctx.data_parallel_size))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world size: per-rank results} of the same global batches at DP=1 and DP=2."""
    return {world: run_distributed(_tasks_body, world, args=(str(tmp_path_factory.mktemp(f"dp{world}")),))
            for world in (1, 2)}


# -- the float64 reference -----------------------------------------------------------------------

def _text(ids, lengths, row):
    return tuple(ids[row, :int(lengths[row])].tolist())


def _infonce_per_anchor(queries, positives, negatives, mask, positive_texts, negative_texts, in_batch):
    """-log(exp(s(q_i, p_i)/t) / sum_{c in C_i} exp(s(q_i, c)/t)) for every anchor i of the global
    batch, unit float64 vectors. in_batch: C_i = the candidates (positives, then hard negatives,
    example-major; valid slots only) that are i's positive, or hold a text other than i's positive's
    that no earlier valid candidate holds. Otherwise C_i = {p_i} + i's own valid negatives."""
    count = len(queries)
    candidates = [(positives[j], positive_texts[j], True) for j in range(count)]
    candidates += [(negatives[j, m], negative_texts[j * K + m], bool(mask[j, m]))
                   for j in range(count) for m in range(K)]
    first, seen = [], set()
    for _, text, valid in candidates:
        first.append(valid and text not in seen)
        if valid:
            seen.add(text)
    losses = []
    for i in range(count):
        if in_batch:
            scored = [vector for c, (vector, text, _) in enumerate(candidates)
                      if c == i or (first[c] and text != positive_texts[i])]
        else:
            scored = [positives[i]] + [negatives[i, m] for m in range(K) if mask[i, m]]
        logits = [float(queries[i] @ vector) / TEMPERATURE for vector in scored]
        top = max(logits)
        log_denominator = top + math.log(sum(math.exp(logit - top) for logit in logits))
        losses.append(log_denominator - float(queries[i] @ positives[i]) / TEMPERATURE)
    return losses


def _cosent(emb1, emb2, scores):
    """log(1 + sum over pairs with gold_i > gold_j of exp(scale * (cos_j - cos_i)))."""
    cosines = [float(emb1[i] @ emb2[i]) for i in range(len(emb1))]
    terms = [COSENT_SCALE * (cosines[j] - cosines[i]) for i in range(len(cosines)) for j in range(len(cosines))
             if scores[i] > scores[j]]
    return math.log(1.0 + sum(math.exp(term) for term in terms))


def _prefix(embeddings, dim):
    return F.normalize(embeddings.to(torch.float64)[..., :dim], dim=-1)


def reference_losses(task, per_rank):
    """(global loss, [loss of each rank]) of the stage's step, from the embeddings each rank's loss
    received: the Matryoshka sum over MATRYOSHKA of the task's loss."""
    batch = TASK_BATCHES[task]()
    world_size = len(per_rank)
    roles = {role: torch.cat([rank["embeddings"][role] for rank in per_rank])
             for role in per_rank[0]["embeddings"]}
    shares = [len(rank["embeddings"]["queries"]) for rank in per_rank]
    bounds = numpy.cumsum([0] + shares)
    total, by_rank = 0.0, [0.0] * world_size
    for dim, weight in MATRYOSHKA.items():
        queries, positives = _prefix(roles["queries"], dim), _prefix(roles["positives"], dim)
        if task == "sts":
            per_rank_loss = [_cosent(queries[a:b], positives[a:b], batch.scores[a:b].tolist())
                             for a, b in zip(bounds[:-1], bounds[1:])]
            total += weight * sum(per_rank_loss) / world_size  # DDP averages the ranks' own losses
            by_rank = [mine + weight * loss for mine, loss in zip(by_rank, per_rank_loss)]
            continue
        negatives = _prefix(roles["hard_negatives"], dim).view(GLOBAL_BATCH, K, dim)
        positive_texts = [_text(batch.positive_ids, batch.positive_lengths, row) for row in range(GLOBAL_BATCH)]
        negative_texts = [_text(batch.negative_ids, batch.negative_lengths, row) for row in range(GLOBAL_BATCH * K)]
        losses = _infonce_per_anchor(queries, positives, negatives, batch.negative_mask, positive_texts,
                                     negative_texts, in_batch=task != "classification")
        total += weight * sum(losses) / GLOBAL_BATCH
        # rank r returns (k / N) * its anchors' sum: the mean over ranks is the global mean
        by_rank = [mine + weight * world_size / GLOBAL_BATCH * sum(losses[a:b])
                   for mine, a, b in zip(by_rank, bounds[:-1], bounds[1:])]
    return total, by_rank


LOSS_TOL = 1e-4  # float32 logits of size 1/t = 20, summed over three Matryoshka dims


@pytest.mark.parametrize("task", list(TASK_BATCHES))
@pytest.mark.parametrize("world_size", [1, 2])
def test_task_loss_equals_the_float64_reference(runs, task, world_size):
    per_rank = [result[task, 1] for result in runs[world_size]]
    expected, expected_by_rank = reference_losses(task, per_rank)
    for rank, result in enumerate(per_rank):
        assert abs(result["loss"] - expected) < LOSS_TOL, (rank, result["loss"], expected)
        assert abs(result["rank_loss"] - expected_by_rank[rank]) < LOSS_TOL, (rank, result["rank_loss"],
                                                                               expected_by_rank[rank])


def test_every_task_trains_every_parameter(runs):
    """In the mixed run (one trainer, the four tasks in turn), each task's step gives every weight
    of the embedder a gradient (the output layer is not part of the embedder)."""
    for world_size, per_rank in runs.items():
        for task in TASK_BATCHES:
            grads = per_rank[0][task, 1]["grads"]
            assert any(name.startswith("embedding") for name in grads)
            silent = [name for name, grad in grads.items()
                      if not name.startswith("output_layer") and not bool(grad.abs().sum() > 0)]
            assert not silent, (world_size, task, silent)
            assert all(bool(torch.isfinite(grad).all()) for grad in grads.values()), (world_size, task)


def _dhnm_decisions(per_rank_states):
    """{example id: (positions, cursor, exhausted)} and {example id: S_0} over the ranks' shards."""
    decisions, first_scores = {}, {}
    for state in per_rank_states:
        for row, example_id in enumerate(state["example_ids"].tolist()):
            decisions[example_id] = (state["positions"][row].tolist(), int(state["cursor"][row]),
                                     bool(state["exhausted"][row]))
            first_scores[example_id] = state["first_scores"][row]
    return decisions, first_scores


@pytest.mark.parametrize("world_size", [1, 2])
def test_gradcache_equals_the_plain_step(runs, world_size):
    """2 and 4 chunks per role: the same loss, gradients and DHNM decisions as one forward, for
    every task; and DP=2 equal to DP=1 (but for sts, whose CoSENT is per rank by design)."""
    per_rank = runs[world_size]
    replacements = 0
    for task in TASK_BATCHES:
        plain = per_rank[0][task, 1]
        if task != "sts":
            assert_same_step(plain, runs[1][0][task, 1])
        for chunks in CHUNKS[1:]:
            assert_same_step(per_rank[0][task, chunks], plain)
            for result in per_rank:
                assert result[task, chunks]["metrics"].get("dhnm_replacements") == plain["metrics"].get(
                    "dhnm_replacements"), (task, chunks)
        if task in ("retrieval", "clr"):
            expected, expected_first = _dhnm_decisions([runs[1][0][task, 1]["dhnm"]])
            for chunks in CHUNKS:
                decisions, first_scores = _dhnm_decisions([result[task, chunks]["dhnm"] for result in per_rank])
                assert decisions == expected, (task, chunks)
                for example_id, scores in expected_first.items():
                    numpy.testing.assert_allclose(first_scores[example_id], scores, rtol=0, atol=1e-5)
        replacements += plain["metrics"].get("dhnm_replacements", 0)
    assert replacements > 0, "DHNM never acted: the decisions compared would be vacuous"


@pytest.mark.parametrize("world_size", [1, 2])
def test_dhnm_replaces_only_the_slot_its_score_condemns(runs, world_size):
    """Only slot 0 of example 5 scores below 0.999 (checked): it alone moves, to pool position K
    (the next unused), in the state of the rank that owns example 5; the padding slot that also
    scores low stays, and every other rank's shard is untouched."""
    per_rank = [result["alignment"] for result in runs[world_size]]
    scores = torch.cat([result["hard_negative_cosines"] for result in per_rank])  # [B, K]
    assert float(scores[0, 0]) < 0.99 and float(scores[6, 1]) < 0.99, scores
    others = torch.ones_like(scores, dtype=torch.bool)
    others[0, 0] = others[6, 1] = False
    assert bool((scores[others] > 0.9999).all()), scores
    for result in per_rank:
        assert result["metrics"]["dhnm_replacements"] == 1.0
    owner = 5 % world_size
    for rank, result in enumerate(per_rank):
        state = result["dhnm"]
        for row, example_id in enumerate(state["example_ids"].tolist()):
            assert example_id % world_size == rank  # a rank holds only the examples it owns
            moved = example_id == 5
            assert state["positions"][row].tolist() == ([K, 1] if moved else [0, 1]), (rank, example_id)
            assert int(state["cursor"][row]) == (K + 1 if moved else K), (rank, example_id)
        assert sorted(state["example_ids"].tolist()) == sorted(e for e in EXAMPLE_IDS if e % world_size == rank)
        assert (5 in state["example_ids"].tolist()) == (rank == owner)


# -- dropout: the replay draws the cached pass's masks ---------------------------------------------

def _seeded_step(stage, trainer, batch, mini_batch_size, seed):
    from megatron.core import tensor_parallel

    trainer.ctx.cfg.embedding.mini_batch_size = mini_batch_size
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return _step(stage, trainer, batch)


def _dropout_body(rank, world_size, run_dir):
    from megatron_conan.training.trainer import Trainer

    stage = FedStage()
    trainer = Trainer(_cfg(run_dir, transformer_overrides={"hidden_dropout": 0.1}), stage)
    batch = retrieval_batch()
    return {"gradcache": _seeded_step(stage, trainer, batch, 2, seed=7),
            "chunked_graph": _seeded_step(ChunkedForwardStage(), trainer, batch, 2, seed=7),
            "plain": _seeded_step(stage, trainer, batch, 0, seed=7),
            "plain_other_seed": _seeded_step(stage, trainer, batch, 0, seed=8)}


def test_gradcache_replay_sees_the_cached_dropout_mask(tmp_path):
    """hidden_dropout 0.1 (a config override): GradCache's gradient equals that of the same chunked
    forward kept in one graph, so each replayed chunk drew the mask its cached pass drew. (The plain
    step draws other masks: dropout is on, and the RNG matters.)"""
    result = run_distributed(_dropout_body, 1, args=(str(tmp_path),))[0]
    assert abs(result["plain"]["loss"] - result["plain_other_seed"]["loss"]) > 1e-3, "dropout is off"
    assert abs(result["plain"]["loss"] - result["gradcache"]["loss"]) > 1e-3
    assert_same_step(result["gradcache"], result["chunked_graph"])
