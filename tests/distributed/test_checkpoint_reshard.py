"""A dist_checkpointing checkpoint saved at TP2xPP2 loads at TP1 and TP4 and gives the same loss; a
training checkpoint saved with interleaved pipeline chunks resumes without them."""

import os

import torch

from megatron_conan.testing.distributed import run_distributed


def _reshard_body(rank, world_size, checkpoint_dir):
    from megatron_conan.checkpoint.sharded_state import load_model, save_model
    from megatron_conan.config.model import ParallelConfig, tiny
    from megatron_conan.models.transformer_config import build_transformer_config
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.testing.parity import MICRO_BATCH, SEQ_LENGTH, data_parallel_microbatches, synthetic_lm_batch
    from megatron_conan.training.lm_step import lm_forward_step
    from megatron_conan.training.megatron_step import evaluate_loss

    def eval_loss(chunks):
        microbatches = data_parallel_microbatches(synthetic_lm_batch(tiny()))
        return evaluate_loss(lm_forward_step, iter(microbatches), chunks, len(microbatches),
                             SEQ_LENGTH, MICRO_BATCH)

    losses = {}
    for name, parallel, seed, action in [
        ("TP2xPP2 saved", ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 11, "save"),
        ("TP4 loaded", ParallelConfig(tensor_parallel=4), 99, "load"),
        ("TP1 loaded", ParallelConfig(), 77, "load"),
    ]:
        initialize_model_parallel(parallel, seed=seed)  # other seeds: loading must overwrite
        chunks = build_model_chunks(tiny(), build_transformer_config(tiny(), parallel))
        if action == "save":
            save_model(chunks, checkpoint_dir)
        else:
            losses[name + " (before load)"] = eval_loss(chunks)
            load_model(chunks, checkpoint_dir)
        losses[name] = eval_loss(chunks)
    return losses


def test_tp2pp2_checkpoint_loads_at_tp1_and_tp4(tmp_path):
    losses = run_distributed(_reshard_body, 4, args=(str(tmp_path / "ckpt"),))[0]
    saved = losses["TP2xPP2 saved"]
    assert abs(losses["TP4 loaded"] - saved) < 1e-5, losses
    assert abs(losses["TP1 loaded"] - saved) < 1e-5, losses
    # The freshly initialised models really were different before loading.
    assert abs(losses["TP4 loaded (before load)"] - saved) > 1e-4, losses
    assert torch.isfinite(torch.tensor(saved))


def _vpp_runs_body(rank, world_size, base_dir):
    from tests.training.test_loop import _config, _train_body

    base = ["checkpoint.save_interval=2", "checkpoint.keep_last=5", "train.train_steps=4",
            "parallel.pipeline_parallel=2"]
    vpp2 = "parallel.virtual_pipeline_parallel=2"  # 4 layers: 2 stages x 2 chunks of 1 layer
    full = _train_body(rank, world_size, _config(os.path.join(base_dir, "full"), *base, vpp2))["losses"]
    moved = os.path.join(base_dir, "moved")
    _train_body(rank, world_size, _config(moved, *base, vpp2, "train.exit_after_steps=2"))
    resumed = _train_body(rank, world_size, _config(moved, *base))["losses"]  # plain 1F1B: one chunk
    return full, resumed


def test_a_checkpoint_resumes_under_another_virtual_pipeline_size(tmp_path):
    """Saved as model0/model1 (interleaved chunks), resumed as one `model`: dist_checkpointing keys
    the layers by their global names, so the chunking does not matter; the run continues exactly."""
    full, resumed = run_distributed(_vpp_runs_body, 2, args=(str(tmp_path),))[0]
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - full[step]) < 1e-5, (step, resumed, full)
