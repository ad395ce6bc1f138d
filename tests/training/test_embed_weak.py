"""Stage 3 (embed-weak): the contrastive step under DP / TP / SP equals the single process, GradCache
equals the plain step, the soft mask's ends equal megatron-core's causal and bidirectional attention,
runs resume exactly, and bad input gets one clear error."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from megatron_conan.testing.distributed import run_distributed
from tests.training.conftest import CapturingStage, assert_same_step, communicate_or_kill, kill_group, read_metrics
from megatron_conan.training.embedding_stage import WeaklySupervisedStage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny", "embed_weak.yaml")
GLOBAL_BATCH = 8
TOL = 1e-6
SOFT_MASK_STEPS = 4  # the parity step runs at t = 2: a = 0.5, a genuinely soft mask


class FedStage(CapturingStage, WeaklySupervisedStage):
    """Stage 3 fed by the test (step_on_batch) instead of a store and a tokenizer."""

    def check_inputs(self, cfg, model_config):
        pass

    def setup(self, ctx):
        pass


def _cfg(run_dir, tensor_parallel=1, sequence_parallel=False, **embedding):
    from megatron_conan.config.loader import from_dict
    from megatron_conan.config.run import EmbeddingConfig

    return from_dict(EmbeddingConfig, {
        "run_dir": str(run_dir), "model": {"recipe": "tiny", "soft_mask": {
            "total_steps": SOFT_MASK_STEPS, "backend": "reference"}},
        "parallel": {"tensor_parallel": tensor_parallel, "sequence_parallel": sequence_parallel},
        "train": {"train_steps": SOFT_MASK_STEPS, "global_batch_size": GLOBAL_BATCH, "eval_interval": 0},
        "data": {"kind": "contrastive", "contrastive_prefix": "unused-fed-by-the-test"},
        "embedding": {"temperature": 0.05, **embedding}})


def _global_batch():
    """8 ragged (query, positive) pairs; positive 5 is a copy of positive 1 (a false negative)."""
    from megatron_conan.data.contrastive import ContrastiveBatch, pad_sequences

    generator = torch.Generator().manual_seed(5)
    queries = [torch.randint(4, 512, (int(n),), generator=generator).tolist() for n in (3, 9, 5, 12, 7, 4, 11, 6)]
    positives = [torch.randint(4, 512, (int(n),), generator=generator).tolist() for n in (14, 5, 20, 9, 16, 8, 6, 18)]
    positives[5] = list(positives[1])
    query_ids, query_lengths = pad_sequences(queries, 0)
    positive_ids, positive_lengths = pad_sequences(positives, 0)
    return ContrastiveBatch("pair", torch.arange(GLOBAL_BATCH), query_ids, query_lengths, positive_ids, positive_lengths)


def _slice(batch, rank, size):
    from megatron_conan.data.contrastive import ContrastiveBatch

    rows = slice(rank * GLOBAL_BATCH // size, (rank + 1) * GLOBAL_BATCH // size)
    return ContrastiveBatch("pair", batch.example_ids[rows], batch.query_ids[rows], batch.query_lengths[rows],
                            batch.positive_ids[rows], batch.positive_lengths[rows])


def _parity_body(rank, world_size, layout, full_weights, mini_batch_sizes, run_dir):
    from megatron.core import parallel_state

    from megatron_conan.models.embedder import embed
    from megatron_conan.models.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_conan.training.trainer import Trainer
    from megatron_conan.training.megatron_step import zero_grads

    cfg = _cfg(run_dir, **layout)
    stage = FedStage()
    trainer = Trainer(cfg, stage)
    ctx = trainer.ctx
    if full_weights is None:
        full_weights = gather_full_state_dict(ctx.chunks, ctx.model_config)
    load_full_state_dict(ctx.chunks, full_weights, ctx.model_config)
    batch = _global_batch()
    local = _slice(batch, parallel_state.get_data_parallel_rank(), ctx.data_parallel_size)
    results = {"weights": full_weights if rank == 0 else None}
    for setting in mini_batch_sizes:
        # an int: GradCache chunks of that many sequences; (name, overrides of the embedding section)
        key, overrides = (setting, {"mini_batch_size": setting}) if isinstance(setting, int) else setting
        for name, value in {**UNCHUNKED, **overrides}.items():
            setattr(cfg.embedding, name, value)
        zero_grads(ctx.chunks, trainer.optimizer)
        output = stage.step_on_batch(ctx, SOFT_MASK_STEPS // 2, local)
        results[key] = {"loss": output.loss, "a": output.metrics["soft_mask_a"],
                        "grads": gather_full_state_dict(ctx.chunks, ctx.model_config, source="grad"),
                        "captured": stage.captured[-1]["embeddings"]}
    with torch.no_grad():
        results["embeddings"] = embed(ctx.chunks[0], batch.query_ids, batch.query_lengths)
    return results


UNCHUNKED = {"mini_batch_size": 0, "mini_batch_tokens": 0, "packing": False}
# rows of 24 tokens: several texts per row, the 20-token positive nearly alone
PACKED = ("packed", {"packing": True, "max_tokens_per_row": 24})
PACKED_GRADCACHE = ("packed_gradcache", {"packing": True, "max_tokens_per_row": 24, "mini_batch_size": 3})
# chunks of at most 30 true tokens: the positives (96 tokens) in 4+ chunks of uneven counts
TOKEN_CHUNKS = ("token_chunks", {"mini_batch_size": 8, "mini_batch_tokens": 30})


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    settings = (0, 4, 2, PACKED, PACKED_GRADCACHE, TOKEN_CHUNKS)
    return run_distributed(_parity_body, 1, args=({}, None, settings, str(run_dir)))[0]


def test_gradcache_equals_the_plain_step(single_process):
    """2 and 4 chunks of the 8-pair batch: same loss and parameter gradients as one forward."""
    assert single_process[0]["a"] == 0.5
    assert_same_step(single_process[4], single_process[0])
    assert_same_step(single_process[2], single_process[0])


def test_packing_and_token_chunks_equal_the_plain_step(single_process):
    """Packed rows (plain and GradCache) and GradCache chunks sized by tokens: same loss and gradients."""
    for key in ("packed", "packed_gradcache", "token_chunks"):
        assert_same_step(single_process[key], single_process[0])


def test_chunks_by_tokens():
    from megatron_conan.training.contrastive_step import _chunks

    lengths = torch.tensor([14, 5, 20, 9, 40, 8])
    assert _chunks(lengths, 8, 30) == [(0, 2), (2, 4), (4, 5), (5, 6)]  # 40 > 30 stands alone
    assert _chunks(lengths, 2, 100) == [(0, 2), (2, 4), (4, 6)]  # the count still bounds a chunk
    assert _chunks(lengths, 4) == [(0, 4), (4, 6)]


def test_gradcache_cuts_each_role_in_length_order(monkeypatch):
    """GradCache chunks hold texts of like length (each chunk is cut to its longest text), and the loss
    still sees the batch's order: same gradient as the plain step. A stand-in embedder records the
    width of every forward."""
    from megatron_conan.losses.targets import LossTargets
    from megatron_conan.training import contrastive_step
    from megatron_conan.training.contrastive_step import FullBatch, GradCache, RoleEmbedder, Sequences

    weight = torch.nn.Parameter(torch.tensor([[0.3, -0.2]]))
    widths = []

    def embed(model, ids, lengths, pooling, starts=None, max_tokens_per_row=0):
        widths.append(ids.shape[1])
        return (ids.float().sum(1, keepdim=True) + lengths[:, None]) * weight  # [c, 2]

    monkeypatch.setattr(contrastive_step, "embed", embed)
    lengths = torch.tensor([2, 12, 3, 11, 1])
    ids = (torch.arange(12)[None, :] < lengths[:, None]).long() * torch.arange(1, 6)[:, None]
    roles = {"query": Sequences(ids, lengths)}
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])  # a loss that sees the order

    def loss_fn(embeddings, targets):
        return ((embeddings["query"] - target) ** 2).sum(), {}

    grads = {}
    for name, step in (("plain", FullBatch(loss_fn)), ("chunks of 2", GradCache(loss_fn, mini_batch_size=2))):
        widths.clear()
        loss, _ = step.forward_backward(RoleEmbedder(None, "mean", 2), roles, LossTargets())
        grads[name] = (loss, weight.grad.clone(), list(widths))
        weight.grad = None
    assert grads["chunks of 2"][2] == [12, 3, 1] * 2  # lengths 12 11 | 3 2 | 1, cached pass then replay
    assert torch.allclose(grads["chunks of 2"][0], grads["plain"][0])
    assert torch.allclose(grads["chunks of 2"][1], grads["plain"][1])


def test_two_process_layouts_equal_single_process(single_process, tmp_path):
    reference = single_process[0]
    for layout in ({}, {"tensor_parallel": 2}, {"tensor_parallel": 2, "sequence_parallel": True}):
        per_rank = run_distributed(_parity_body, 2, args=(layout, single_process["weights"], (0, 2, PACKED_GRADCACHE),
                                                          str(tmp_path)))
        for result in per_rank:
            assert_same_step(result[0], reference)
            assert_same_step(result[2], reference)  # GradCache under DP / TP too
            assert_same_step(result["packed_gradcache"], reference)  # packed GradCache chunks under DP / TP / SP
            # every TP rank (and TP2 vs TP1) gives the same embeddings
            assert float((result["embeddings"] - single_process["embeddings"]).abs().max()) < TOL, layout


def test_tp2_dp2_equals_single_process(single_process, tmp_path):
    per_rank = run_distributed(_parity_body, 4, args=({"tensor_parallel": 2}, single_process["weights"], (0,),
                                                      str(tmp_path)))
    for result in per_rank:
        assert_same_step(result[0], single_process[0])


def _pair_loss_float64(captured, kept):
    """Mean over anchors i of -s_ii/t + log sum_{j in kept[i]} exp(s_ij/t), in float64."""
    queries, positives = (F.normalize(captured[role].double(), dim=-1) for role in ("queries", "positives"))
    logits = queries @ positives.T / 0.05  # [8, 8]
    return float(sum(torch.logsumexp(logits[i, kept[i]], 0) - logits[i, i] for i in range(GLOBAL_BATCH))) / GLOBAL_BATCH


def test_a_duplicate_positive_counts_once_in_every_denominator(single_process, tmp_path):
    """Positive 5 is a copy of positive 1. With masking, anchors 1 and 5 leave the other copy out
    (a false negative) and every other anchor scores that text once; without it every anchor
    scores both. Both losses are recomputed in float64 from the embeddings the step produced."""
    everyone = list(range(GLOBAL_BATCH))
    kept = {i: [j for j in everyone if j != 5] for i in everyone}  # the first copy (1) stays
    kept[5] = [j for j in everyone if j != 1]  # anchor 5's own copy is its label
    captured = single_process[0]["captured"]
    assert abs(single_process[0]["loss"] - _pair_loss_float64(captured, kept)) < 1e-5
    unmasked = run_distributed(_unmasked_body, 1, args=(single_process["weights"], str(tmp_path)))[0]
    assert abs(unmasked - _pair_loss_float64(captured, {i: everyone for i in everyone})) < 1e-5
    assert unmasked > single_process[0]["loss"] + 1e-3  # the case is not vacuous


def _unmasked_body(rank, world_size, full_weights, run_dir):
    from megatron_conan.models.sharding import load_full_state_dict
    from megatron_conan.training.trainer import Trainer

    stage = FedStage()
    trainer = Trainer(_cfg(run_dir, mask_duplicate_positives=False), stage)
    load_full_state_dict(trainer.ctx.chunks, full_weights, trainer.ctx.model_config)
    return stage.step_on_batch(trainer.ctx, SOFT_MASK_STEPS // 2, _global_batch()).loss


# -- the ends of the schedule equal megatron-core's attention ------------------------------------

def _ends_body(rank, world_size):
    from megatron_conan.config.model import ParallelConfig, tiny
    from megatron_conan.models.transformer_config import build_transformer_config
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.models.embedder import _without_output_layer, embed, key_padding_mask
    from megatron_conan.models.pooling import pool
    from megatron_conan.models.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_conan.ops.soft_mask_attention import SoftMaskConfig
    from megatron_conan.ops.soft_mask_attention.core_attention import set_soft_mask_step, soft_mask_core_attention_spec

    initialize_model_parallel(ParallelConfig())
    model_config = tiny()
    transformer_config = build_transformer_config(model_config, ParallelConfig())
    (soft,) = build_model_chunks(model_config, transformer_config, use_transformer_engine=False,
                                 core_attention=soft_mask_core_attention_spec(
                                     SoftMaskConfig(total_steps=10, backend="reference")))
    (megatron_attention,) = build_model_chunks(model_config, transformer_config, use_transformer_engine=False)
    load_full_state_dict([megatron_attention], gather_full_state_dict([soft], model_config), model_config)
    batch = _global_batch()
    ids, lengths = batch.positive_ids, batch.positive_lengths
    seq_len = ids.shape[1]
    positions = torch.arange(seq_len).expand(ids.shape[0], seq_len)

    def megatron_embeddings(mask):
        with torch.no_grad(), _without_output_layer(megatron_attention):
            hidden = megatron_attention(input_ids=ids, position_ids=positions, attention_mask=mask)
        return pool(hidden, lengths)

    with torch.no_grad():
        set_soft_mask_step(soft, 0)
        first = embed(soft, ids, lengths)
        set_soft_mask_step(soft, 10)
        last = embed(soft, ids, lengths)
    # DotProductAttention: no mask = causal (padded keys come after the real ones, so causal rows
    # never see them); a key-padding mask replaces the causal mask = bidirectional over real keys
    return {"first": first, "last": last, "causal": megatron_embeddings(None),
            "bidirectional": megatron_embeddings(key_padding_mask(lengths, seq_len))}


def test_schedule_ends_equal_causal_and_bidirectional_attention():
    result = run_distributed(_ends_body, 1)[0]
    assert float((result["first"] - result["causal"]).abs().max()) < 1e-5
    assert float((result["last"] - result["bidirectional"]).abs().max()) < 1e-5
    assert float((result["first"] - result["last"]).abs().max()) > 1e-3


# -- whole runs: resume, metrics, bad input ---------------------------------------------------

def _arguments(run_dir, data, *overrides):
    return ["--config", TINY, f"run_dir={run_dir}", f"data.tokenizer={data['tokenizer']}",
            f"data.contrastive_prefix={data['pairs']}", "checkpoint.load_dir=null", "model.soft_mask.backend=reference",
            *overrides]


def _launch(run_dir, data, *overrides):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_conan.training.embed_weak", *_arguments(run_dir, data, *overrides)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


_metrics = read_metrics


def _wait_for_step(run_dir, step, process, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _metrics(run_dir) and max(_metrics(run_dir)) >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{process.stdout.read()}")
        time.sleep(0.1)  # a tighter poll competes with the run for the 2 cores
    raise AssertionError(f"step {step} not reached in {timeout} s")


RUN = ("train.train_steps=24", "checkpoint.save_interval=4", "checkpoint.keep_last=2", "embedding.mini_batch_size=3")


@pytest.fixture(scope="module")
def uninterrupted(embedding_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    process = _launch(run_dir, embedding_data, *RUN)
    output, _ = communicate_or_kill(process, 300)
    assert process.returncode == 0, output
    return {"run_dir": run_dir, **_metrics(run_dir)}


def _before_and_after_body(rank, world_size, arguments, trained_checkpoint):
    """The loss of the run's first batch with its initial weights and with its trained weights."""
    from megatron_conan.checkpoint.metadata import read_checkpoint_info
    from megatron_conan.checkpoint.standalone import read_full_state_dict
    from megatron_conan.models.sharding import load_full_state_dict
    from megatron_conan.training.stage_main import parse_run_config
    from megatron_conan.training.trainer import Trainer

    trained = read_full_state_dict(read_checkpoint_info(trained_checkpoint))
    _, cfg = parse_run_config("embed-weak", arguments)
    stage = WeaklySupervisedStage()
    trainer = Trainer(cfg, stage)  # the run's config and seed: its initial weights
    ctx, last = trainer.ctx, cfg.train.steps() - 1
    first_batch = next(trainer.loader)
    trainer.loader.close()
    result = {"initial_at_first_step": stage.step_on_batch(ctx, 0, first_batch).loss,
              "initial": stage.step_on_batch(ctx, last, first_batch).loss}
    load_full_state_dict(ctx.chunks, trained, ctx.model_config)
    result["trained"] = stage.step_on_batch(ctx, last, first_batch).loss
    return result


def test_a_follows_the_schedule_and_the_loss_falls(uninterrupted, embedding_data, tmp_path):
    """a(t) is logged as scheduled, and the trained model scores the run's first batch better than
    the initial model did, both at the last step's a (the same batch, the same attention)."""
    assert sorted(step for step in uninterrupted if step != "run_dir") == list(range(1, 25))
    for step, record in ((s, r) for s, r in uninterrupted.items() if s != "run_dir"):
        assert record["soft_mask_a"] == (step - 1) / 23  # a(t) of the forward of t = step - 1 of 0..23
    result = run_distributed(_before_and_after_body, 1, args=(
        _arguments(tmp_path, embedding_data, *RUN), os.path.join(uninterrupted["run_dir"], "checkpoints")))[0]
    # the body rebuilt the run's first step: its batch, its initial weights (threads round differently)
    assert abs(result["initial_at_first_step"] - uninterrupted[1]["loss"]) < 1e-5, result
    assert result["trained"] < result["initial"] - 0.05, result


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill"])
def test_interrupted_run_resumes_exactly(how, embedding_data, uninterrupted, tmp_path):
    """Killed mid-run, the restart resumes from the last periodic checkpoint to the same losses and
    a(t). The signal path (save on SIGTERM / USR1, exit 0, resume) of this stage runs in the cluster
    test under SLURM (`make cluster-test`: time limit and preemption, identical steps); the shared
    loop's own SIGTERM save is tests/training/test_loop.py's. "sigterm" still works here by hand."""
    process = _launch(tmp_path, embedding_data, *RUN)
    try:
        _wait_for_step(tmp_path, 10, process)
    except BaseException:
        kill_group(process)
        raise
    if how == "sigkill":
        kill_group(process)  # the whole job, as a scheduler kills it
    else:
        process.send_signal(signal.SIGTERM)
        output, _ = communicate_or_kill(process, 120)
        assert process.returncode == 0, output
    stopped_at = max(_metrics(tmp_path))
    assert stopped_at < 24, "the run ended before the signal"
    if how == "sigterm":
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped_at:07d}"
    process = _launch(tmp_path, embedding_data, *RUN)
    output, _ = communicate_or_kill(process, 300)
    assert process.returncode == 0, output
    assert "resumed from" in output
    resumed = _metrics(tmp_path)
    for step in range(stopped_at + 1, 25):
        assert resumed[step]["loss"] == uninterrupted[step]["loss"], step
        assert resumed[step]["soft_mask_a"] == uninterrupted[step]["soft_mask_a"], step


def _run_quietly(*argv):
    env = dict(os.environ)
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "megatron_conan.training.embed_weak", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_pipeline_parallelism_is_refused_by_name(embedding_data, tmp_path):
    result = _run_quietly("--config", TINY, f"run_dir={tmp_path}", f"data.tokenizer={embedding_data['tokenizer']}",
                          f"data.contrastive_prefix={embedding_data['pairs']}", "parallel.pipeline_parallel=2")
    assert result.returncode != 0
    assert "parallel.pipeline_parallel=2" in result.stderr and "pipeline parallelism" in result.stderr


def test_a_store_of_another_tokenizer_is_refused(embedding_data, tmp_path):
    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer

    train_tokenizer([str(embedding_data["dir"] / "text.jsonl")], str(tmp_path / "other"),
                    TokenizerTrainingConfig(vocab_size=512, num_threads=1, seed=99, max_sentences=200,
                                            character_coverage=0.98))
    result = _run_quietly("--config", TINY, f"run_dir={tmp_path / 'run'}", f"data.tokenizer={tmp_path / 'other.model'}",
                          f"data.contrastive_prefix={embedding_data['pairs']}", "checkpoint.load_dir=null")
    assert result.returncode != 0
    assert "another tokenizer" in result.stderr, result.stderr[-2000:]


def test_a_checkpoint_of_another_shape_is_refused(embedding_data, uninterrupted, tmp_path):
    checkpoints = os.path.join(uninterrupted["run_dir"], "checkpoints")
    result = _run_quietly("--config", TINY, f"run_dir={tmp_path}", f"data.tokenizer={embedding_data['tokenizer']}",
                          f"data.contrastive_prefix={embedding_data['pairs']}", f"checkpoint.load_dir={checkpoints}",
                          "model.overrides={hidden_size: 128, ffn_hidden_size: 256}")
    assert result.returncode != 0
    assert "hidden_size: checkpoint 64 vs model 128" in result.stderr, result.stderr[-2000:]
