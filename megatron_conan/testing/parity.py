"""Layout-parity harness: one training step of the tiny Conan model under any TP/PP/DP/SP layout.

Every layout starts from the same full weights and sees the same global batch; it returns the loss,
the full (gathered, unsharded) gradients after megatron-core's gradient reduction, and the full
weights after one AdamW update. Comparing these with the single-process run is the proof that a
layout is correct. Bodies here run inside :func:`megatron_conan.testing.distributed.run_distributed`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state

from megatron_conan.config.model import ConanModelConfig, ParallelConfig, tiny
from megatron_conan.config.run import LanguageModelConfig, OptimizerSection
from megatron_conan.distributed.device import current_placement
from megatron_conan.distributed.parallel import initialize_model_parallel
from megatron_conan.models.conan import build_model_chunks
from megatron_conan.models.sharding import gather_full_state_dict, load_full_state_dict
from megatron_conan.models.transformer_config import build_transformer_config
from megatron_conan.training.lm_stage import LanguageModelStage
from megatron_conan.training.megatron_step import build_optimizer, optimizer_step, wrap_model, zero_grads
from megatron_conan.training.stage import StageContext

GLOBAL_BATCH = 8
MICRO_BATCH = 2
SEQ_LENGTH = 32


@dataclass
class Layout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    virtual_pipeline_parallel: Optional[int] = None

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(**asdict(self))

    def __str__(self) -> str:
        text = f"TP{self.tensor_parallel}xPP{self.pipeline_parallel}"
        if self.virtual_pipeline_parallel:
            text += f"xVPP{self.virtual_pipeline_parallel}"
        if self.sequence_parallel:
            text += "+SP"
        if self.use_distributed_optimizer:
            text += "+DistOpt"
        return text


def synthetic_lm_batch(model_config: ConanModelConfig, seed: int = 7, ragged_loss: bool = False) -> Dict[str, torch.Tensor]:
    """A fixed global batch of random tokens, [GLOBAL_BATCH, SEQ_LENGTH] each.

    `ragged_loss`: every sequence has a different number of loss tokens (as SFT outputs do), so a
    mean of per-micro-batch means would differ from the mean over the batch's loss tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model_config.vocab_size, (GLOBAL_BATCH, SEQ_LENGTH + 1), generator=generator)
    loss_mask = torch.ones(GLOBAL_BATCH, SEQ_LENGTH)
    loss_mask[:, :3] = 0.0  # a partly masked loss exercises the mask path
    if ragged_loss:
        for row in range(GLOBAL_BATCH):
            loss_mask[row, : 3 + (row * 7) % (SEQ_LENGTH - 4)] = 0.0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ_LENGTH).expand(GLOBAL_BATCH, SEQ_LENGTH).contiguous(),
    }


def data_parallel_microbatches(batch: Dict[str, torch.Tensor], micro_batch: int = MICRO_BATCH
                               ) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's contiguous share of the global batch, cut into micro-batches."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_rank = GLOBAL_BATCH // dp_size
    start = dp_rank * per_rank
    return [
        {k: v[i:i + micro_batch] for k, v in batch.items()}
        for i in range(start, start + per_rank, micro_batch)
    ]


def one_step(layout: Layout, full_weights: Optional[Dict[str, torch.Tensor]], seed: int = 1234,
             micro_batch: int = MICRO_BATCH, ragged_loss: bool = False) -> dict:
    """Build, load `full_weights` (or keep the seeded init), train one step; see module doc."""
    model_config = tiny()
    parallel = layout.parallel_config()
    initialize_model_parallel(parallel, seed=seed)
    transformer_config = build_transformer_config(model_config, parallel)
    chunks = build_model_chunks(model_config, transformer_config)
    if full_weights is not None:
        load_full_state_dict(chunks, full_weights, model_config)
    initial = gather_full_state_dict(chunks, model_config)
    wrapped = wrap_model(chunks, transformer_config, use_distributed_optimizer=layout.use_distributed_optimizer)
    # adam_eps well above gradient round-off: with eps 1e-8, Adam turns 1e-9 gradient differences
    # of near-zero entries into lr-sized update differences, which says nothing about the layout.
    section = OptimizerSection(lr=1e-2, weight_decay=0.01, clip_grad=1e9, adam_eps=1e-3)
    optimizer = build_optimizer(wrapped, transformer_config, section,
                                use_distributed_optimizer=layout.use_distributed_optimizer)
    # the language-model stage's own step (the Trainer's), over the fixed batch as its dataset
    batch = synthetic_lm_batch(model_config, ragged_loss=ragged_loss)
    samples = [{key: value[row] for key, value in batch.items()} for row in range(GLOBAL_BATCH)]
    stage = LanguageModelStage("pretrain")
    stage.use_data(samples, None, global_batch=GLOBAL_BATCH, micro_batch=micro_batch, seq_length=SEQ_LENGTH,
                   data_parallel_size=parallel_state.get_data_parallel_world_size())
    # the stage reads no config here (use_data gave it its batches): the defaults stand in
    ctx = StageContext(cfg=LanguageModelConfig(), model_config=model_config, transformer_config=transformer_config,
                       chunks=wrapped,
                       placement=current_placement(), data_parallel_rank=parallel_state.get_data_parallel_rank(),
                       data_parallel_size=parallel_state.get_data_parallel_world_size(),
                       data_parallel_group=parallel_state.get_data_parallel_group(), total_steps=1)
    zero_grads(wrapped, optimizer)
    loss = stage.train_step(ctx, 0).loss
    _, grad_norm = optimizer_step(optimizer)
    grads = gather_full_state_dict(wrapped, model_config, source="grad")
    updated = gather_full_state_dict(wrapped, model_config)
    attention = chunks[0].decoder.layers[0].self_attention
    return {"layout": str(layout), "loss": loss, "grad_norm": grad_norm,
            "initial": initial, "grads": grads, "updated": updated,
            "kv_groups_per_rank": attention.num_query_groups_per_partition,
            "qkv_rows_per_rank": attention.linear_qkv.weight.shape[0]}


def layouts_body(rank: int, world_size: int, layouts: List[Layout], full_weights) -> List[dict]:
    """run_distributed body: one step per layout in turn (re-initialising the groups each time)."""
    results = []
    for layout in layouts:
        outcome = one_step(layout, full_weights)
        if rank != 0:  # every rank holds the same gathered dicts; rank 0 reports them
            outcome = {"layout": outcome["layout"], "loss": outcome["loss"]}
        results.append(outcome)
    return results


def max_abs_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per-key max |a - b|; raises if the key sets differ."""
    if set(a) != set(b):
        raise AssertionError(f"key sets differ: only in a {sorted(set(a) - set(b))}, only in b {sorted(set(b) - set(a))}")
    return {k: float((a[k] - b[k]).abs().max()) for k in a}
