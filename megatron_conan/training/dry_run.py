"""What a run will cost before it starts: the ``--dry-run`` report of the training entry points.

Pure arithmetic on the configs (no tensors, no process groups), so it runs on a login node:

* :func:`model_flops_per_token`: the model FLOPs of the GPU check (docs/GPU.md, part `train_step`), the numerator of MFU.
* :func:`estimate_memory_per_gpu`: weights, gradients, optimizer state and activations of the most
  loaded pipeline stage, as megatron-core keeps them (mixed precision, fp32 gradient buffers,
  optional distributed optimizer, 1F1B schedule).
* :func:`dry_run_report` / :func:`format_dry_run`: the layout (which rank holds which TP/PP/DP
  coordinates), batch arithmetic, steps for a token budget, parameters, memory and FLOPs.

The memory figures are an estimate of what the model, optimizer and autograd hold; the CUDA
context, NCCL buffers, allocator fragmentation and temporary workspaces come on top (typically a few
GiB per GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_conan.config.model import PRECISIONS, RECOMPUTE_MODES, ConanModelConfig, ParallelConfig
from megatron_conan.errors import ConfigError

ACTIVATION_LAYERS = ("te", "local")
"""Whose layers the activation estimate counts: Transformer Engine's fused ones, or our local ones."""
MEGATRON_RANK_ORDER = "tp-cp-ep-dp-pp"
"""megatron-core's default rank order (``initialize_model_parallel(order=...)``): TP varies fastest."""

_GIB = float(1 << 30)
_MAX_RANKS_SHOWN = 16


def _param_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _check_precision_and_recompute(precision: str, recompute: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")


def model_flops_per_token(model_cfg: ConanModelConfig, seq_length: int) -> float:
    """Model FLOPs (forward + backward) per trained token (docs/GPU.md, part `train_step`).

    ``6 * N_non_embedding + 6 * vocab * hidden + 12 * layers * hidden * seq_length``: the matmuls of
    the transformer layers, the tied output layer, and the attention scores and weighted sum
    (counted in full, not halved for the causal mask, as in the PaLM/Megatron convention).

    Uses the **true** vocabulary (``model_cfg.vocab_size``), not the TP-padded one: the padding rows
    are computed but are not model FLOPs, and the figure then does not change with the layout.
    """
    if seq_length <= 0:
        raise ConfigError(f"seq_length must be positive, got {seq_length}")
    non_embedding = model_cfg.num_parameters(include_embedding=False)
    h, layers = model_cfg.hidden_size, model_cfg.num_layers
    return float(6 * non_embedding + 6 * model_cfg.vocab_size * h + 12 * layers * h * seq_length)


def stage_parameters(model_cfg: ConanModelConfig, parallel: ParallelConfig) -> List[int]:
    """Parameters held by one GPU of each pipeline stage (one TP shard).

    Linear weights and the (padded) vocabulary are split over TP; RMSNorm weights are replicated.
    The first stage holds the word embedding. The last stage holds the final norm and the output
    layer: with tied embeddings and PP > 1 megatron-core keeps a copy of the embedding there (its
    gradient is all-reduced with the first stage's), with PP = 1 the one matrix serves both.
    """
    parallel.validate_for_model(model_cfg)
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    h, d = model_cfg.hidden_size, model_cfg.head_dim
    sharded_per_layer = (
        h * d * (model_cfg.num_attention_heads + 2 * model_cfg.num_query_groups)  # fused QKV
        + model_cfg.num_attention_heads * d * h  # attention output projection
        + 3 * h * model_cfg.ffn_hidden_size  # SwiGLU gate, up, down
    ) // tp
    per_layer = sharded_per_layer + 2 * h  # + the two RMSNorm weights
    embedding = model_cfg.padded_vocab_size(tp) * h // tp
    layers_per_stage = model_cfg.num_layers // pp
    stages = [layers_per_stage * per_layer for _ in range(pp)]
    stages[0] += embedding
    stages[-1] += h  # final norm
    if pp > 1 or not model_cfg.tie_embeddings:
        stages[-1] += embedding  # output layer (a tied copy when PP > 1)
    return stages


@dataclass(frozen=True)
class ParameterShape:
    """One parameter tensor of a pipeline stage on one TP rank, as megatron-core registers it."""

    name: str
    numel: int
    shared_embedding: bool = False
    """The tied embedding's two copies under PP > 1 (megatron-core's ``shared_embedding``): the
    distributed optimizer gives each its own gradient bucket."""


def stage_parameter_shapes(model_cfg: ConanModelConfig, parallel: ParallelConfig, stage: int) -> List[ParameterShape]:
    """Pipeline stage `stage`'s parameters on one TP rank, in ``named_parameters()`` order of
    ``GPTModel`` with our local layer spec (the order fixes where the distributed optimizer pads).

    Transformer Engine fuses each layer's norms into the next linear layer: the same tensors in
    another order, which moves the distributed optimizer's padding by up to 64 elements a tensor.
    """
    parallel.validate_for_model(model_cfg)
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    if not 0 <= stage < pp:
        raise ConfigError(f"pipeline stage {stage} is outside 0..{pp - 1}")
    h, d, f = model_cfg.hidden_size, model_cfg.head_dim, model_cfg.ffn_hidden_size
    a, g = model_cfg.num_attention_heads, model_cfg.num_query_groups
    embedding = model_cfg.padded_vocab_size(tp) * h // tp
    tied_copy = model_cfg.tie_embeddings and pp > 1
    shapes = []
    if stage == 0:
        shapes.append(ParameterShape("embedding.word_embeddings.weight", embedding, tied_copy))
    for layer in range(model_cfg.num_layers // pp):
        prefix = f"decoder.layers.{layer}."
        shapes += [ParameterShape(prefix + "input_layernorm.weight", h),
                   ParameterShape(prefix + "self_attention.linear_proj.weight", a * d * h // tp),
                   ParameterShape(prefix + "self_attention.linear_qkv.weight", h * d * (a + 2 * g) // tp),
                   ParameterShape(prefix + "pre_mlp_layernorm.weight", h),
                   ParameterShape(prefix + "mlp.linear_fc1.weight", 2 * h * f // tp),  # SwiGLU gate and up
                   ParameterShape(prefix + "mlp.linear_fc2.weight", f * h // tp)]
    if stage == pp - 1:
        shapes.append(ParameterShape("decoder.final_layernorm.weight", h))
        if pp > 1 or not model_cfg.tie_embeddings:
            shapes.append(ParameterShape("output_layer.weight", embedding, tied_copy))
    return shapes


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def gradient_buckets(shapes: Sequence[ParameterShape], data_parallel: int,
                     use_distributed_optimizer: bool) -> List[Tuple[int, int, List[Tuple[int, int]]]]:
    """megatron-core DDP's gradient buffer of one model chunk, as ``_ParamAndGradBuffer`` lays it
    out with our ``wrap_model`` (no overlap, so one bucket; one dtype): ``[(bucket start, bucket
    end, [(param start, param end), ...]), ...]`` in elements.

    Parameters go in reverse order. With the distributed optimizer each parameter starts on a
    multiple of 64 elements, each bucket ends on a multiple of lcm(DP, 128) so that it shards
    evenly, and a ``shared_embedding`` parameter gets a bucket of its own.
    """
    buckets: List[Tuple[int, int, List[Tuple[int, int]]]] = []
    bucket_start, param_start, ranges = 0, 0, []

    def close(end: int) -> int:
        nonlocal bucket_start, ranges
        if use_distributed_optimizer:
            end = _round_up(end, math.lcm(data_parallel, 128))
        buckets.append((bucket_start, end, ranges))
        bucket_start, ranges = end, []
        return end

    for shape in reversed(shapes):
        if use_distributed_optimizer:
            param_start = _round_up(param_start, 64)
        own_bucket = use_distributed_optimizer and shape.shared_embedding
        if own_bucket and ranges:
            param_start = close(param_start)
        ranges.append((param_start, param_start + shape.numel))
        param_start += shape.numel
        if own_bucket:
            param_start = close(param_start)
    if ranges:
        close(param_start)
    return buckets


def state_bytes_per_rank(model_cfg: ConanModelConfig, parallel: ParallelConfig, world_size: int, rank: int,
                         precision: str = "bf16", use_distributed_optimizer: Optional[bool] = None) -> Dict[str, int]:
    """Exact bytes of one rank's ``weights``, ``gradients`` (DDP buffer) and ``optimizer`` state
    (fp32 main copy for bf16/fp16, Adam m and v), as megatron-core allocates them with our
    ``wrap_model`` / ``build_optimizer`` (no virtual pipeline).

    * weights: each parameter in the parameter dtype; with the distributed optimizer the parameters
      live in megatron-core's padded parameter buffer, so its padding counts too;
    * gradients: the fp32 ``main_grad`` buffer (``grad_reduce_in_fp32``), padded likewise;
    * optimizer: 12 bytes (fp32: 8) per element this rank updates: every element without the
      distributed optimizer, with it this rank's 1/DP slice of each bucket, padding excluded.
    """
    _check_precision_and_recompute(precision, "none")
    if parallel.virtual_pipeline_parallel:
        raise ConfigError("exact state bytes cover layouts without parallel.virtual_pipeline_parallel")
    if use_distributed_optimizer is None:
        use_distributed_optimizer = parallel.use_distributed_optimizer
    dp = parallel.data_parallel(world_size)
    _, stage, dp_rank = rank_coordinates(rank, parallel, world_size)
    shapes = stage_parameter_shapes(model_cfg, parallel, stage)
    buckets = gradient_buckets(shapes, dp, use_distributed_optimizer)
    numel = sum(shape.numel for shape in shapes)
    buffer = buckets[-1][1] if buckets else 0
    updated = numel
    if use_distributed_optimizer:
        updated = 0
        for start, end, ranges in buckets:
            shard = (end - start) // dp
            low, high = start + dp_rank * shard, start + (dp_rank + 1) * shard
            updated += sum(max(0, min(high, stop) - max(low, begin)) for begin, stop in ranges)
    return {
        "weights": (buffer if use_distributed_optimizer else numel) * _param_bytes(precision),
        "gradients": buffer * 4,
        "optimizer": updated * (8 if precision == "fp32" else 12),
    }


def activation_bytes_per_layer(
    model_cfg: ConanModelConfig,
    micro_batch_size: int,
    seq_length: int,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    precision: str = "bf16",
    recompute: str = "none",
    layers: str = "te",
) -> int:
    """Bytes one transformer layer keeps for backward, for one micro-batch.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") give
    ``s*b*h*(34 + 5*a*s/h)`` bytes for a GPT layer with 16-bit activations. For the Conan block
    (pre-RMSNorm, GQA with ``a`` query heads and ``g`` KV groups of width ``d``, SwiGLU of width
    ``f``, no dropout, flash-style attention that keeps no ``s x s`` matrix) the same accounting,
    in elements of the activation dtype (``p`` bytes: 2 for bf16/fp16, 4 for fp32), is::

        norm-1 input h + QKV input h + norm-2 input h + FC1 input h     = 4h   (replicated over TP
                                                                                unless SP: then /t)
        Q, K, V after RoPE  d*(a + 2g),  attention output  a*d          = 2d(a + g)        (/t)
        SwiGLU: gate and up outputs 2f, FC2 input f                     = 3f               (/t)

        bytes = s*b * p * (4h / t_sp + (2d(a + g) + 3f) / t)  +  4*b*a*s / t  (fp32 softmax LSE)

    with ``t_sp = t`` under sequence parallelism, else 1. For MHA with a 4h GeLU MLP this is
    Korthikanti's ``34 sbh`` less the two dropout masks and the ``s^2`` terms. ``selective``
    recomputes the core attention (megatron-core's default ``recompute_modules``), which with a
    flash-style kernel only drops the LSE term. ``full`` keeps just the layer input,
    ``s*b*h*p / t_sp``; the one layer being recomputed is added by the caller.

    ``layers="te"`` is the accounting above: Transformer Engine's fused layers on GPUs.
    ``layers="local"`` is what megatron_conan's own layers keep (the path without TE), measured on the
    CPU allocator by benchmarks/activation_memory.py: each RMSNorm computes in fp32 and keeps an fp32
    copy of its input and its fp32 normalised output (8h bytes instead of the input's h*p, plus a
    4-byte rstd per token), SwiGLU keeps silu(gate) (f more), and V, a view of the fused QKV output,
    keeps that whole output alive (d(a + g) more)::

        local = te + s*b * (2 * (8h - p*h + 4) / t_sp  +  p * (f + d(a + g)) / t)
    """
    _check_precision_and_recompute(precision, recompute)
    if layers not in ACTIVATION_LAYERS:
        raise ConfigError(f"layers must be one of {ACTIVATION_LAYERS}, got {layers!r}")
    t = tensor_parallel
    t_sp = t if sequence_parallel else 1
    p = _param_bytes(precision)
    s, b = seq_length, micro_batch_size
    h, d, f = model_cfg.hidden_size, model_cfg.head_dim, model_cfg.ffn_hidden_size
    a, g = model_cfg.num_attention_heads, model_cfg.num_query_groups
    if recompute == "full":
        return s * b * p * h // t_sp
    layer = s * b * p * (4 * h * (t // t_sp) + 2 * d * (a + g) + 3 * f) // t
    if recompute == "none":
        layer += 4 * b * a * s // t
    if layers == "local":
        layer += s * b * 2 * (8 * h - p * h + 4) // t_sp + s * b * p * (f + d * (a + g)) // t
    return layer


def _stage_state_bytes(model_cfg: ConanModelConfig, parallel: ParallelConfig, world_size: int, stage: int,
                       params: int, precision: str, use_distributed_optimizer: bool) -> Dict[str, int]:
    """Weights, gradients and optimizer bytes of the most loaded rank of a pipeline stage: exact
    (:func:`state_bytes_per_rank`) without a virtual pipeline, else per parameter (fp32 main copy
    for bf16/fp16, Adam m and v: 12 bytes, 8 for fp32; divided by DP with the distributed
    optimizer), which leaves out megatron-core's padding of at most 64 elements a tensor."""
    if parallel.virtual_pipeline_parallel:
        optimizer = params * (8 if precision == "fp32" else 12)
        if use_distributed_optimizer:
            optimizer = -(-optimizer // parallel.data_parallel(world_size))
        return {"weights": params * _param_bytes(precision), "gradients": params * 4, "optimizer": optimizer}
    tp = parallel.tensor_parallel
    dp = parallel.data_parallel(world_size)
    first_rank = stage * tp * dp  # megatron-core's order: TP fastest, then DP, then PP
    ranks = range(first_rank, first_rank + tp * dp, tp) if use_distributed_optimizer else [first_rank]
    per_rank = [state_bytes_per_rank(model_cfg, parallel, world_size, rank, precision, use_distributed_optimizer)
                for rank in ranks]
    return max(per_rank, key=lambda entry: entry["optimizer"])


def _memory_per_stage(
    model_cfg: ConanModelConfig,
    parallel: ParallelConfig,
    world_size: int,
    micro_batch_size: int,
    seq_length: int,
    precision: str,
    use_distributed_optimizer: bool,
    recompute: str,
    num_microbatches: Optional[int],
) -> List[Dict[str, int]]:
    _check_precision_and_recompute(precision, recompute)
    if micro_batch_size <= 0:
        raise ConfigError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if seq_length <= 0:
        raise ConfigError(f"seq_length must be positive, got {seq_length}")
    dp = parallel.data_parallel(world_size)
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    sp = parallel.sequence_parallel
    t_sp = tp if sp else 1
    act = _param_bytes(precision)
    s, b, h = seq_length, micro_batch_size, model_cfg.hidden_size
    layers_per_stage = model_cfg.num_layers // pp

    stored = activation_bytes_per_layer(model_cfg, b, s, tp, sp, precision, recompute)
    # Under full recompute the layer whose backward runs holds its whole activations again.
    working_layer = (activation_bytes_per_layer(model_cfg, b, s, tp, sp, precision, "none")
                     if recompute == "full" else 0)
    # Last stage: final-norm and output-layer inputs, and the fp32 softmax that megatron-core's
    # vocab-parallel cross-entropy saves ([s, b, V/t] in float32).
    head = 2 * s * b * act * h // t_sp + 4 * s * b * model_cfg.padded_vocab_size(tp) // tp

    stages = []
    for stage, params in enumerate(stage_parameters(model_cfg, parallel)):
        # 1F1B: stage k runs pp - k warm-up forwards before its first backward.
        in_flight = pp - stage if num_microbatches is None else min(pp - stage, num_microbatches)
        activations = in_flight * layers_per_stage * stored + working_layer
        if stage == pp - 1:
            activations += head
        breakdown = {**_stage_state_bytes(model_cfg, parallel, world_size, stage, params, precision,
                                          use_distributed_optimizer),
                     "activations": activations}
        breakdown["total"] = sum(breakdown.values())
        stages.append(breakdown)
    return stages


def estimate_memory_per_gpu(
    model_cfg: ConanModelConfig,
    parallel: ParallelConfig,
    world_size: int,
    micro_batch_size: int,
    seq_length: int,
    precision: str = "bf16",
    use_distributed_optimizer: Optional[bool] = None,
    recompute: str = "none",
    num_microbatches: Optional[int] = None,
) -> Dict[str, int]:
    """Bytes on the most loaded GPU: ``weights``, ``gradients``, ``optimizer``, ``activations``, ``total``.

    * weights: the largest pipeline stage's TP shard (:func:`stage_parameters`) in the parameter
      dtype (bf16/fp16 2 bytes, fp32 4).
    * gradients: 4 bytes per parameter, megatron-core DDP's fp32 ``main_grad`` buffer
      (``grad_reduce_in_fp32``); the distributed optimizer reduce-scatters in place, so it stays whole.
    * optimizer: fp32 master weights (bf16/fp16 only) + Adam m and v, 12 (8 for fp32) bytes per
      parameter, divided by the data-parallel size with the distributed optimizer.
    * activations: :func:`activation_bytes_per_layer` times the layers of a stage times the
      micro-batches in flight (1F1B: stage k holds ``pp - k``, so the first stage holds ``pp``;
      capped by ``num_microbatches`` when given), plus on the last stage the final-norm and
      output-layer inputs and the fp32 cross-entropy softmax ``4*s*b*V_padded/t``.

    ``use_distributed_optimizer`` defaults to ``parallel.use_distributed_optimizer``. The stage with
    the largest total is reported. Not included: CUDA context, NCCL and allocator overhead.
    """
    if use_distributed_optimizer is None:
        use_distributed_optimizer = parallel.use_distributed_optimizer
    stages = _memory_per_stage(model_cfg, parallel, world_size, micro_batch_size, seq_length,
                               precision, use_distributed_optimizer, recompute, num_microbatches)
    return stages[_most_loaded(stages)]


def _most_loaded(stages: List[Dict[str, int]]) -> int:
    return max(range(len(stages)), key=lambda stage: stages[stage]["total"])


def rank_coordinates(rank: int, parallel: ParallelConfig, world_size: int) -> Tuple[int, int, int]:
    """``(tp, pp, dp)`` coordinates of a global rank in megatron-core's default order
    ``tp-cp-ep-dp-pp`` (context and expert parallel size 1): TP fastest, then DP, then PP."""
    dp = parallel.data_parallel(world_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size}")
    tp = parallel.tensor_parallel
    return rank % tp, rank // (tp * dp), (rank // tp) % dp


DEFAULT_MFU = 0.40
"""Model FLOPs utilisation assumed for time figures: Megatron-LM reports 41% for a 1.7B GPT on H100."""
DEFAULT_PEAK_TFLOPS = 989.0
"""Dense bf16 peak of an H100 SXM (the H200 is the same chip), TFLOP/s per GPU."""
DEFAULT_FS_GBPS = 5.0
"""Sustained write bandwidth of the file system to the job, GB/s over all its writers."""


@dataclass
class PlanningAssumptions:
    """What the time figures of the dry run assume (command line: ``--mfu``, ``--peak-tflops``,
    ``--fs-gbps``); the report states them next to the figures."""

    mfu: float = DEFAULT_MFU
    """Model FLOPs utilisation, 0 < mfu <= 1."""
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    """Peak dense TFLOP/s of one GPU in the training precision."""
    fs_gbps: float = DEFAULT_FS_GBPS
    """GB/s (1e9 bytes) the job's checkpoint writes get from the file system, all ranks together."""

    def __post_init__(self):
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {self.mfu}")
        for name in ("peak_tflops", "fs_gbps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def checkpoint_bytes(model_cfg: ConanModelConfig, tensor_parallel: int, precision: str) -> int:
    """Bytes of one training checkpoint, all ranks together: every parameter once (the TP-padded
    vocabulary; a tied embedding once) in the parameter dtype, plus the optimizer state that
    megatron-core saves with it: the fp32 main copy (bf16/fp16 only) and Adam's m and v."""
    _check_precision_and_recompute(precision, "none")
    per_parameter = _param_bytes(precision) + (8 if precision == "fp32" else 12)
    return model_cfg.num_parameters(tensor_parallel) * per_parameter


@dataclass
class DryRunReport:
    """Everything ``--dry-run`` prints; :func:`format_dry_run` renders it."""

    model_cfg: ConanModelConfig
    parallel: ParallelConfig
    world_size: int
    data_parallel: int
    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step on each DP rank: global / (micro * DP)."""
    seq_length: int
    tokens_per_step: int
    token_budget: Optional[float]
    steps_for_budget: Optional[int]
    """ceil(token_budget / tokens_per_step), or None without a budget."""
    parameters: int
    """Whole model, embeddings counted once (TP-padded vocabulary)."""
    parameters_per_gpu: int
    """Largest pipeline stage's TP shard."""
    precision: str
    recompute: str
    use_distributed_optimizer: bool
    memory: Dict[str, int]
    """Bytes per GPU by category on the most loaded stage, see :func:`estimate_memory_per_gpu`."""
    memory_stage: int
    """Pipeline stage whose GPUs need the most memory."""
    flops_per_token: float
    flops_per_step: float
    assumptions: PlanningAssumptions = field(default_factory=PlanningAssumptions)
    checkpoint_bytes: int = 0
    """One checkpoint, all ranks together (:func:`checkpoint_bytes`)."""
    save_interval: int = 0
    """Steps between checkpoints (0: none planned)."""

    @property
    def seconds_per_step(self) -> float:
        """Model FLOPs of a step over the world's peak times the assumed MFU."""
        peak = self.world_size * self.assumptions.peak_tflops * 1e12
        return self.flops_per_step / (peak * self.assumptions.mfu)

    @property
    def days_for_budget(self) -> Optional[float]:
        if self.steps_for_budget is None:
            return None
        return self.steps_for_budget * self.seconds_per_step / 86_400

    @property
    def checkpoint_write_seconds(self) -> float:
        return self.checkpoint_bytes / (self.assumptions.fs_gbps * 1e9)

    def __str__(self) -> str:
        return format_dry_run(self)


def _check_batch(model_cfg: ConanModelConfig, parallel: ParallelConfig, world_size: int, global_batch_size: int,
                 micro_batch_size: int, seq_length: int, token_budget: Optional[float]) -> int:
    """The data-parallel size, once the layout, batch, sequence and budget are found consistent."""
    if world_size <= 0:
        raise ConfigError(f"world size must be positive, got {world_size}")
    data_parallel = parallel.data_parallel(world_size)
    parallel.validate_for_model(model_cfg)
    if global_batch_size <= 0 or micro_batch_size <= 0:
        raise ConfigError(
            f"global_batch_size ({global_batch_size}) and micro_batch_size ({micro_batch_size}) "
            "must be positive")
    if global_batch_size % (micro_batch_size * data_parallel) != 0:
        raise ConfigError(
            f"global_batch_size ({global_batch_size}) is not divisible by micro_batch_size * "
            f"data-parallel size ({micro_batch_size} * {data_parallel} = "
            f"{micro_batch_size * data_parallel}; DP = world {world_size} / (TP "
            f"{parallel.tensor_parallel} * PP {parallel.pipeline_parallel}))")
    if seq_length > model_cfg.max_sequence_length:
        raise ConfigError(
            f"seq_length ({seq_length}) exceeds model.max_sequence_length "
            f"({model_cfg.max_sequence_length})")
    if token_budget is not None and token_budget <= 0:
        raise ConfigError(f"token budget must be positive, got {token_budget}")
    return data_parallel


def dry_run_report(
    model_cfg: ConanModelConfig,
    parallel: ParallelConfig,
    world_size: int,
    global_batch_size: int,
    micro_batch_size: int,
    seq_length: int,
    precision: str = "bf16",
    recompute: str = "none",
    token_budget: Optional[float] = None,
    use_distributed_optimizer: Optional[bool] = None,
    assumptions: Optional[PlanningAssumptions] = None,
    save_interval: int = 0,
) -> DryRunReport:
    """Check the batch and layout arithmetic and compute the dry-run figures; `assumptions` (MFU,
    peak FLOP/s, file-system bandwidth) turn them into time, `save_interval` into checkpoint writes.

    Raises :class:`ConfigError` when the layout does not divide the world or cannot split the
    model, when ``global_batch_size`` is not a multiple of ``micro_batch_size * DP``, or when
    ``seq_length`` exceeds the model's context.
    """
    data_parallel = _check_batch(model_cfg, parallel, world_size, global_batch_size, micro_batch_size,
                                 seq_length, token_budget)
    if use_distributed_optimizer is None:
        use_distributed_optimizer = parallel.use_distributed_optimizer
    accumulation = global_batch_size // (micro_batch_size * data_parallel)
    tokens_per_step = global_batch_size * seq_length
    flops_per_token = model_flops_per_token(model_cfg, seq_length)
    stages = _memory_per_stage(model_cfg, parallel, world_size, micro_batch_size, seq_length,
                               precision, use_distributed_optimizer, recompute, accumulation)
    most_loaded = _most_loaded(stages)
    return DryRunReport(
        model_cfg=model_cfg,
        parallel=parallel,
        world_size=world_size,
        data_parallel=data_parallel,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=accumulation,
        seq_length=seq_length,
        tokens_per_step=tokens_per_step,
        token_budget=token_budget,
        steps_for_budget=None if token_budget is None else math.ceil(token_budget / tokens_per_step),
        parameters=model_cfg.num_parameters(parallel.tensor_parallel),
        parameters_per_gpu=max(stage_parameters(model_cfg, parallel)),
        precision=precision,
        recompute=recompute,
        use_distributed_optimizer=use_distributed_optimizer,
        memory=stages[most_loaded],
        memory_stage=most_loaded,
        flops_per_token=flops_per_token,
        flops_per_step=flops_per_token * tokens_per_step,
        assumptions=assumptions or PlanningAssumptions(),
        checkpoint_bytes=checkpoint_bytes(model_cfg, parallel.tensor_parallel, precision),
        save_interval=save_interval,
    )


def format_dry_run(report: DryRunReport) -> str:
    """The dry-run report as text (one fact per line, rank table capped at 16 rows)."""
    model, par = report.model_cfg, report.parallel
    tp, pp, dp = par.tensor_parallel, par.pipeline_parallel, report.data_parallel
    padded = model.padded_vocab_size(tp)
    non_embedding = model.num_parameters(include_embedding=False)
    on_off = {True: "on", False: "off"}
    lines = [
        "megatron_conan dry run",
        f"model: {report.parameters:,} parameters ({non_embedding:,} non-embedding; vocab "
        f"{model.vocab_size:,} padded to {padded:,}); {model.num_layers} layers, hidden "
        f"{model.hidden_size}",
        f"parallel layout: world {report.world_size} = TP {tp} x PP {pp} x DP {dp}",
        f"  sequence parallel: {on_off[par.sequence_parallel]} (SP size {tp if par.sequence_parallel else 1}); "
        f"distributed optimizer: {on_off[report.use_distributed_optimizer]}; "
        f"layers per pipeline stage: {model.num_layers // pp}",
        f"  rank -> (tp, pp, dp), megatron-core order {MEGATRON_RANK_ORDER} (TP fastest):",
    ]
    for rank in range(min(report.world_size, _MAX_RANKS_SHOWN)):
        coords = rank_coordinates(rank, par, report.world_size)
        lines.append(f"    rank {rank:>4} -> tp {coords[0]}, pp {coords[1]}, dp {coords[2]}")
    if report.world_size > _MAX_RANKS_SHOWN:
        lines.append("    ...")
    lines += [
        f"batch: global {report.global_batch_size} sequences, micro {report.micro_batch_size}, "
        f"DP {dp} -> gradient-accumulation steps {report.gradient_accumulation_steps}",
        f"tokens per step: {report.tokens_per_step:,} ({report.global_batch_size} x "
        f"{report.seq_length})",
    ]
    if report.token_budget is not None:
        lines.append(f"steps for {report.token_budget:.3g} tokens: {report.steps_for_budget:,}")
    lines += [
        f"model FLOPs: {report.flops_per_token:.4g} per token, {report.flops_per_step:.4g} per "
        f"step ({report.flops_per_step / report.world_size:.4g} per GPU)",
        f"parameters per GPU (largest stage): {report.parameters_per_gpu:,}",
        "memory per GPU (estimate"
        + (f" for the most loaded pipeline stage, {report.memory_stage} of 0..{pp - 1}" if pp > 1 else "")
        + f"; {report.precision}, recompute {report.recompute}, activations of Transformer Engine's layers; "
        "excludes CUDA context, NCCL and allocator overhead):",
    ]
    for name in ("weights", "gradients", "optimizer", "activations", "total"):
        lines.append(f"  {name:<12} {report.memory[name] / _GIB:8.2f} GiB")
    return "\n".join(lines + _planning_lines(report))


def _planning_lines(report: DryRunReport) -> List[str]:
    """Time per step and to the token budget, checkpoint size and write time, with what they assume."""
    assumed = report.assumptions
    lines = [f"time (assuming MFU {assumed.mfu:.0%} of {assumed.peak_tflops:g} TFLOP/s per GPU; --mfu, "
             f"--peak-tflops): {report.seconds_per_step:.3g} s per step"]
    if report.days_for_budget is not None:
        lines[-1] += (f"; {report.token_budget:.3g} tokens in {report.steps_for_budget:,} steps: "
                      f"{report.days_for_budget:.2f} days on {report.world_size} GPUs")
    main_copy = "" if report.precision == "fp32" else " + fp32 main copy"
    lines.append(f"checkpoint: {report.checkpoint_bytes / 1e9:.2f} GB (every parameter once in "
                 f"{report.precision}{main_copy} + Adam m and v); one write at {assumed.fs_gbps:g} GB/s "
                 f"(--fs-gbps): {report.checkpoint_write_seconds:.3g} s")
    if report.save_interval and report.steps_for_budget:
        saves = report.steps_for_budget // report.save_interval
        lines[-1] += (f"; every {report.save_interval:,} steps: {saves:,} saves, "
                      f"{saves * report.checkpoint_write_seconds / 3600:.3g} h of writing if synchronous")
    return lines
