"""Does the dry run's activation estimate hold? Measured against the CPU allocator, per layer.

    python -m benchmarks.activation_memory [--seq-lengths 256 1024] [--json out.json]

Builds the Conan model of megatron-core (our layer spec, bf16 through ``Float16Module``) at a small
width with 2 and with 4 layers, runs one training forward and records, with
``torch.profiler.profile(profile_memory=True)``, how many bytes the CPU allocator still holds when
the forward returns: what autograd keeps for backward, plus the embedding, the head and the loss.
Half the difference between the 4- and the 2-layer model is what one transformer layer keeps, which
is what ``dry_run.activation_bytes_per_layer(..., layers="local")`` estimates for our own layers (the
path without Transformer Engine; the TE figure, which the dry run reports for GPUs, is printed beside
it and cannot be measured without TE). Each sequence length runs with recompute
``none``, ``selective`` (megatron-core's core-attention recompute) and ``full`` (every layer, one at
a time). The estimate assumes a flash-style attention kernel that keeps the output and the softmax
log-sum-exp but no [s, s] matrix (Transformer Engine's and our fused kernels on GPUs); on the CPU,
torch's SDPA with ``is_causal`` is such a kernel, so the benchmark plugs it into the core-attention
slot (``FlashCausalAttention``). Prints measured / estimated per case; docs/SCALE.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List

import torch
from megatron.core.transformer.module import MegatronModule

WIDTH = {"hidden_size": 256, "num_attention_heads": 8, "num_query_groups": 4, "head_dim": 32,
         "ffn_hidden_size": 704, "vocab_size": 512, "max_sequence_length": 2048}
BATCH = 2
MODES = ("none", "selective", "full")


class FlashCausalAttention(MegatronModule):
    """Core attention through torch's fused SDPA with ``is_causal`` (on the CPU its flash kernel keeps
    only the output and the log-sum-exp for backward). q [s, b, a, d], k and v [s, b, g, d] ->
    [s, b, a * d]."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        q, k, v = (tensor.permute(1, 2, 0, 3) for tensor in (query, key, value))  # [b, heads, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=k.shape[1] != q.shape[1])
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, a * d]


def _held_after_forward(layers: int, seq_length: int, recompute: str) -> int:
    """Bytes the allocator holds when a training forward of a `layers`-layer model returns."""
    import dataclasses

    from torch.profiler import ProfilerActivity, profile

    from megatron_conan.config.model import ParallelConfig, tiny
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.models.transformer_config import build_transformer_config
    from megatron_conan.training.megatron_step import wrap_model
    from megatron_conan.training.trainer import _transformer_overrides

    model_config = dataclasses.replace(tiny(), num_layers=layers, **WIDTH)
    parallel = ParallelConfig()
    initialize_model_parallel(parallel)
    run = type("Run", (), {"train": type("Train", (), {"recompute": recompute})(),
                           "model": type("Model", (), {"transformer_overrides": {}})()})()
    stage = type("Stage", (), {"transformer_overrides": staticmethod(dict)})()
    transformer_config = build_transformer_config(model_config, parallel, precision="bf16",
                                                  transformer_overrides=_transformer_overrides(run, stage))
    model = wrap_model(build_model_chunks(model_config, transformer_config, core_attention=FlashCausalAttention),
                       transformer_config)[0]
    model.train()
    tokens = torch.randint(0, model_config.vocab_size, (BATCH, seq_length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq_length).expand(BATCH, seq_length)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        loss = model(tokens, positions, None, labels=tokens)  # [b, s]
    held = sum(event.self_cpu_memory_usage for event in profiler.key_averages())
    loss.float().sum().backward()  # the graph was real: it runs backward
    return held


def measure(rank: int, world_size: int, seq_lengths: List[int]) -> List[dict]:
    """run_distributed body (one rank): measured and estimated bytes per layer for every case."""
    import dataclasses

    from megatron_conan.config.model import tiny
    from megatron_conan.training.dry_run import activation_bytes_per_layer

    rows = []
    for seq_length in seq_lengths:
        for recompute in MODES:
            two, four = (_held_after_forward(layers, seq_length, recompute) for layers in (2, 4))
            measured = (four - two) / 2
            model_config = dataclasses.replace(tiny(), num_layers=4, **WIDTH)
            estimate, fused = (activation_bytes_per_layer(model_config, BATCH, seq_length, precision="bf16",
                                                          recompute=recompute, layers=layers)
                               for layers in ("local", "te"))
            rows.append({"seq_length": seq_length, "recompute": recompute, "measured_bytes": measured,
                         "estimated_bytes": estimate, "ratio": measured / estimate, "te_estimate_bytes": fused})
    return rows


def main(argv=None) -> int:
    from megatron_conan.distributed.spawn import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = run_distributed(measure, 1, args=(args.seq_lengths,), timeout_s=1800, log_level=logging.WARNING)[0]
    print(f"per transformer layer, batch {BATCH}, width {WIDTH['hidden_size']}, bf16 (measured = CPU allocator)")
    print("| sequence | recompute | measured MiB | estimated MiB (local layers) | measured / estimated | "
          "TE layers' estimate MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['seq_length']} | {row['recompute']} | {row['measured_bytes'] / 2**20:.3f} | "
              f"{row['estimated_bytes'] / 2**20:.3f} | {row['ratio']:.3f} | {row['te_estimate_bytes'] / 2**20:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"batch": BATCH, "width": WIDTH, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
