"""Stage-3 training throughput (pairs/s) against sentence-transformers, in one process.

Ours: the embed-weak stage's step (soft-mask attention, gathered InfoNCE, megatron-core DDP and
optimizer), plain and with GradCache. Theirs: sentence-transformers training a Hugging Face
``LlamaModel`` of the same shape (``is_causal: false``, mean pooling, Normalize) with
``MultipleNegativesRankingLoss`` and, against our GradCache, ``CachedMultipleNegativesRankingLoss``
with the same mini-batch size; AdamW, the same batch, the same lengths, the same temperature (scale
= 1 / temperature). Rounds are interleaved (ours, theirs, ours, ...) so that machine load hits both
alike; the ratio is ours / theirs per round, and its median is reported.

    python benchmarks/embed_step.py                          # CPU: tiny shape, batch 32, lengths 32/64
    python benchmarks/embed_step.py --recipe conan_1p4b --batch 64 --query-length 256 \\
        --passage-length 512 --mini-batch-size 16 --precision bf16     # on a GPU (docs/GPU.md, part `embed_step`)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

from megatron_conan.console import set_offline_switches

set_offline_switches()  # before sentence-transformers loads: nothing here downloads


def _batch(vocab_size: int, batch: int, query_length: int, passage_length: int, seed: int):
    import torch

    from megatron_conan.data.contrastive import ContrastiveBatch

    generator = torch.Generator().manual_seed(seed)
    queries = torch.randint(4, vocab_size, (batch, query_length), generator=generator)
    passages = torch.randint(4, vocab_size, (batch, passage_length), generator=generator)
    return ContrastiveBatch("pair", torch.arange(batch), queries, torch.full((batch,), query_length),
                            passages, torch.full((batch,), passage_length))


class _Ours:
    """The embed-weak stage fed fixed batches, one world of one process."""

    def __init__(self, args, run_dir: str, mini_batch_size: int):
        from megatron_conan.config.loader import from_dict
        from megatron_conan.training.config import RunConfig
        from megatron_conan.training.embedding_stage import WeaklySupervisedStage
        from megatron_conan.training.loop import build_trainer

        class FedStage(WeaklySupervisedStage):
            """Fed fixed batches by step_on_batch: no store, no tokenizer."""

            def check_inputs(self, cfg, model_config):
                pass

            def setup(self, ctx):
                pass

        cfg = from_dict(RunConfig, {
            "run_dir": run_dir, "model": {"recipe": args.recipe, "soft_mask": {"total_steps": 1000}},
            "train": {"train_steps": 1000, "global_batch_size": args.batch, "precision": args.precision,
                      "eval_interval": 0},
            "optimizer": {"lr": 1e-5, "warmup_fraction": 0.0, "decay_style": "constant"},
            "data": {"kind": "contrastive", "contrastive_prefix": "unused"},
            "embedding": {"temperature": args.temperature, "mini_batch_size": mini_batch_size,
                          "mask_duplicate_positives": False}})
        self.stage = FedStage()
        self.trainer = build_trainer(cfg, self.stage)
        self.step_index = 0

    def step(self, batch) -> None:
        from megatron_conan.training.step import optimizer_step, zero_grads

        ctx = self.trainer.ctx
        zero_grads(ctx.chunks, self.trainer.optimizer)
        self.stage.step_on_batch(ctx, self.step_index, batch)
        optimizer_step(self.trainer.optimizer)
        self.step_index += 1


class _Theirs:
    """sentence-transformers training a Hugging Face Llama of the same shape."""

    def __init__(self, args, directory: str, mini_batch_size: int):
        import torch
        from sentence_transformers import SentenceTransformer, losses, models
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

        from megatron_conan.config.model import model_recipe

        shape = model_recipe(args.recipe)
        config = LlamaConfig(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_query_groups, head_dim=shape.head_dim, rms_norm_eps=shape.norm_epsilon,
            rope_theta=shape.rotary_base, max_position_embeddings=max(args.passage_length, args.query_length),
            tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
        config.is_causal = False
        LlamaModel(config).save_pretrained(directory)
        vocab = {"<pad>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, shape.vocab_size)}}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                            pad_token="<pad>", unk_token="<unk>")
        tokenizer.save_pretrained(directory)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        transformer = models.Transformer(directory, model_kwargs={"dtype": dtype})
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(modules=[transformer, models.Pooling(shape.hidden_size, "mean"),
                                                  models.Normalize()], device=device)
        self.model.train()
        scale = 1.0 / args.temperature
        self.loss = (losses.CachedMultipleNegativesRankingLoss(self.model, scale=scale, mini_batch_size=mini_batch_size)
                     if mini_batch_size else losses.MultipleNegativesRankingLoss(self.model, scale=scale))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.device = device

    def step(self, batch) -> None:
        features = [{"input_ids": ids.to(self.device), "attention_mask": (ids != 0).long().to(self.device)}
                    for ids in (batch.query_ids, batch.positive_ids)]
        loss = self.loss(features, None)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def _time(trainer, batch, steps: int, synchronize) -> float:
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch)
    synchronize()
    return time.perf_counter() - started


def main(argv=None) -> int:
    import torch

    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="conan_1p4b" if on_gpu else "tiny")
    parser.add_argument("--batch", type=int, default=64 if on_gpu else 32, help="pairs per step")
    parser.add_argument("--query-length", type=int, default=256 if on_gpu else 32)
    parser.add_argument("--passage-length", type=int, default=512 if on_gpu else 64)
    parser.add_argument("--mini-batch-size", type=int, default=16 if on_gpu else 8,
                        help="GradCache chunk (ours) = CachedMNRL mini_batch_size (theirs)")
    parser.add_argument("--precision", default="bf16" if on_gpu else "fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    from megatron_conan.console import configure_logging

    configure_logging(logging.WARNING)  # the figures only

    from megatron_conan.config.model import model_recipe
    from megatron_conan.distributed.parallel import destroy_parallel, init_process_group_from_env

    init_process_group_from_env()
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    batch = _batch(model_recipe(args.recipe).vocab_size, args.batch, args.query_length, args.passage_length, seed=0)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for label, mini_batch_size in (("plain", 0), ("cached", args.mini_batch_size)):
                ours = _Ours(args, os.path.join(scratch, f"ours_{label}"), mini_batch_size)
                theirs = _Theirs(args, os.path.join(scratch, f"theirs_{label}"), mini_batch_size)
                for trainer in (ours, theirs):
                    _time(trainer, batch, args.warmup, synchronize)
                ratios, ours_rates, theirs_rates = [], [], []
                for _ in range(args.rounds):
                    ours_rate = args.steps * args.batch / _time(ours, batch, args.steps, synchronize)
                    theirs_rate = args.steps * args.batch / _time(theirs, batch, args.steps, synchronize)
                    ours_rates.append(ours_rate)
                    theirs_rates.append(theirs_rate)
                    ratios.append(ours_rate / theirs_rate)
                rows.append({"mode": label, "mini_batch_size": mini_batch_size,
                             "ours_pairs_per_s": statistics.median(ours_rates),
                             "theirs_pairs_per_s": statistics.median(theirs_rates),
                             "ratio_median": statistics.median(ratios), "ratios": ratios})
                del ours, theirs
    finally:
        destroy_parallel()
    import sentence_transformers

    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"stage-3 step: {args.recipe}, batch {args.batch} pairs, query/passage {args.query_length}/"  # user-facing
          f"{args.passage_length} tokens, {args.precision}, {device}, torch {torch.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}")
    print(f"{'mode':>7} {'ours pairs/s':>13} {'ST pairs/s':>11} {'ratio':>6}  per-round ratios")
    for row in rows:
        theirs_name = "CachedMNRL" if row["mini_batch_size"] else "MNRL"
        print(f"{row['mode']:>7} {row['ours_pairs_per_s']:>13.1f} {row['theirs_pairs_per_s']:>11.1f} "
              f"{row['ratio_median']:>5.2f}x  {' '.join(f'{r:.2f}' for r in row['ratios'])}  (vs {theirs_name})")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
