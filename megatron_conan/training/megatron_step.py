"""The pieces of one optimizer step on megatron-core, shared by every stage.

``wrap_model`` puts each model chunk in megatron-core's DistributedDataParallel (and Float16Module
for bf16/fp16), ``build_optimizer`` returns ``get_megatron_optimizer``'s optimizer,
``run_schedule`` runs the pipeline schedule from ``get_forward_backward_func`` over the micro-batches
of one global batch (forward, backward and ``finalize_model_grads``: DP all-reduce or
reduce-scatter, sequence-parallel norms over TP, tied embeddings over PP), ``reduce_reports`` turns
the per-micro-batch reports into global numbers, and ``optimizer_step`` applies the update.
``evaluate_loss`` chains them without gradients for one language-model batch. The step itself is
the stage's (``LanguageModelStage.train_step``) and the Trainer's update: one path, which the
layout-parity harness (``testing/parity.py``) drives too.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_conan.config.run import OptimizerSection
from megatron_conan.distributed.device import current_placement


def wrap_model(
    chunks: List[torch.nn.Module],
    transformer_config: TransformerConfig,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    bucket_size: Optional[int] = None,
) -> List[DistributedDataParallel]:
    """Float16Module (bf16/fp16) and megatron-core DDP around each chunk; grads reduce in fp32."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        if transformer_config.bf16 or transformer_config.fp16:
            chunk = Float16Module(transformer_config, chunk)
        wrapped.append(DistributedDataParallel(
            config=transformer_config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk gets bucketing when interleaving, as in Megatron-LM.
            disable_bucketing=index > 0,
        ))
    transformer_config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        transformer_config.no_sync_func = [m.no_sync for m in wrapped]
        if len(wrapped) == 1:
            transformer_config.no_sync_func = transformer_config.no_sync_func[0]
    return wrapped


def build_optimizer(chunks: List[DistributedDataParallel], transformer_config: TransformerConfig,
                    section: OptimizerSection, use_distributed_optimizer: bool = False):
    """AdamW of the run's optimizer section through ``get_megatron_optimizer`` (mixed precision
    follows the model's config)."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=section.lr,
        min_lr=section.min_lr,
        weight_decay=section.weight_decay,
        adam_beta1=section.adam_beta1,
        adam_beta2=section.adam_beta2,
        adam_eps=section.adam_eps,
        clip_grad=section.clip_grad,
        bf16=transformer_config.bf16,
        fp16=transformer_config.fp16,
        params_dtype=transformer_config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
        loss_scale=None if transformer_config.fp16 else 1.0,
        initial_loss_scale=2.0 ** 16,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    transformer_config.grad_scale_func = optimizer.scale_loss
    return optimizer


def zero_grads(chunks: List[DistributedDataParallel], optimizer) -> None:
    """Clear the DDP gradient buffers and the optimizer's gradients before a step's backward."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def optimizer_step(optimizer) -> Tuple[bool, Optional[float]]:
    """Apply the update from the reduced gradients: (update_successful, grad norm before clipping)."""
    update_successful, grad_norm, _ = optimizer.step()
    return bool(update_successful), None if grad_norm is None else float(grad_norm)


def reduce_reports(reports: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Global values from a schedule's per-micro-batch reports (computed on the last PP stage).

    A report value of two numbers ``[sum, count]`` is a ratio: sums and counts add up over
    micro-batches and DP ranks before dividing (``{"lm loss": [loss sum, tokens]}`` gives the mean
    over every loss token of the global batch; the count is also returned as ``<name> count``). A
    one-number value is a mean: averaged over micro-batches, then over DP ranks. Broadcast to the
    other pipeline stages, so every rank returns the same dict.
    """
    placement = current_placement()
    names = sorted(reports[0]) if reports else []
    values = placement.zeros(2 * len(names), dtype=torch.float64)  # per name: [sum or mean, count]
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and reports:
        for i, name in enumerate(names):
            stacked = torch.stack([report[name].double().reshape(-1) for report in reports])  # [m, 1 or 2]
            if stacked.shape[1] == 2:
                values[2 * i:2 * i + 2] = stacked.sum(dim=0).to(values.device)
            else:
                values[2 * i] = stacked[:, 0].mean().to(values.device)
                values[2 * i + 1] = -1.0  # marks a mean
    # Names are known only on the last stage: ship them with the values.
    holder = [names]
    placement.broadcast_object_list(holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    if holder[0] != names:
        names = holder[0]
        values = placement.zeros(2 * len(names), dtype=torch.float64)
    placement.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    placement.all_reduce(values, group=parallel_state.get_data_parallel_group())
    dp_size = parallel_state.get_data_parallel_world_size()
    reduced: Dict[str, float] = {}
    for i, name in enumerate(names):
        total, count = float(values[2 * i]), float(values[2 * i + 1])
        if count < 0:  # a mean on every DP rank: -dp_size after the all-reduce
            reduced[name] = total / dp_size
        else:
            reduced[name] = total / count if count > 0 else float("nan")
            reduced[f"{name} count"] = count
    return reduced


def _per_chunk_iterators(data_iterator, num_chunks: int):
    """Interleaved schedules read every micro-batch once per model chunk: one iterator each."""
    if num_chunks == 1:
        return data_iterator[0] if isinstance(data_iterator, list) else data_iterator
    if not isinstance(data_iterator, list) or len(data_iterator) != num_chunks:
        raise ValueError(
            f"{num_chunks} model chunks (virtual pipeline) need a list of {num_chunks} data "
            "iterators over the same micro-batches"
        )
    return data_iterator


def run_schedule(forward_step_func, data_iterator, chunks, num_microbatches: int, seq_length: int,
                 micro_batch_size: int, forward_only: bool) -> List[Dict[str, torch.Tensor]]:
    """megatron-core's pipeline schedule over one global batch; returns the per-micro-batch reports."""
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=_per_chunk_iterators(data_iterator, len(chunks)),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def evaluate_loss(
    forward_step_func: Callable,
    data_iterator: Iterator,
    chunks: List[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    loss_key: str = "lm loss",
) -> float:
    """Mean loss over `num_microbatches` without gradients (evaluation, parity checks)."""
    with torch.no_grad():
        reports = run_schedule(forward_step_func, data_iterator, chunks, num_microbatches, seq_length,
                               micro_batch_size, forward_only=True)
    return reduce_reports(reports).get(loss_key, float("nan"))
