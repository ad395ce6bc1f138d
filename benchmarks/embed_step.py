"""Stage-3 training throughput (pairs/s) against sentence-transformers, in one process.

Ours: the embed-weak stage's step (soft-mask attention, gathered InfoNCE, megatron-core DDP and
optimizer), plain and with GradCache, on right-padded batches and, with ``--packing``, on packed
rows (``embedding.packing``: texts back to back in rows of ``--max-tokens-per-row`` tokens).
Theirs: sentence-transformers training a Hugging Face ``LlamaModel`` of the same shape
(``is_causal: false``, mean pooling, Normalize) with ``MultipleNegativesRankingLoss`` and, against
our GradCache, ``CachedMultipleNegativesRankingLoss`` with the same mini-batch size (and, with
``--mini-batch-tokens N``, both sides again with chunks cut by true tokens instead: ours
``embedding.mini_batch_tokens``, theirs ``mini_batch_num_tokens``, the same N); AdamW, the same
batches, the same temperature (scale = 1 / temperature). Rounds are interleaved (ours padded, ours
packed, theirs, ...) so that machine load hits every side alike; the ratio is ours / theirs per
round, and its median is reported.

Data (``--data``):
  fixed       one batch of random ids, every query --query-length and every passage
              --passage-length tokens (no padding: the upper bound of a padded step's efficiency)
  synthetic   --batches batches of random ids: --query-length-token queries beside passages drawn
              uniformly from --min-passage-length to --passage-length tokens
  quickstart  --batches batches of the main job's own stage-3 pairs (``--work-dir``, the run's
              tokenizer, truncation and model shape from ``embed-weak/config.yaml``)
Each run prints the share of padding tokens of each layout and the collectives each step calls.

``--prefetch`` (with ``--data quickstart``) times instead the Trainer's whole stage-3 step as the main
job runs it: its config (model shape, batch, packing, lengths), the batch read from its store by the
Trainer's loader, the update; rounds alternate the read-ahead thread (``train.prefetch``) on and
off in one trainer, and the ratio on / off per round and its median are reported.

    python benchmarks/embed_step.py                                  # CPU: tiny shape, fixed batch
    python benchmarks/embed_step.py --data quickstart --work-dir runs/quickstart --packing
    python benchmarks/embed_step.py --data quickstart --work-dir runs/quickstart --prefetch
    python benchmarks/embed_step.py --data synthetic --packing --batch 32 --mini-batch-size 8
    python benchmarks/embed_step.py --recipe conan_1p4b --data synthetic --packing --batch 64 \\
        --mini-batch-size 16 --precision bf16              # on a GPU (docs/GPU.md, part `embed_step`)
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
from typing import Dict, List

from megatron_conan.console import set_offline_switches

set_offline_switches()  # before sentence-transformers loads: nothing here downloads

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all", "all_to_all_single")
"""torch.distributed functions a step's collectives go through (counted per step)."""


class Workload:
    """The batches every side trains on, and the model and embedding settings they imply."""

    def __init__(self, description: str, batches: List, model_overrides: Dict, embedding: Dict):
        self.description = description
        self.batches = batches
        self.model_overrides = model_overrides
        self.embedding = embedding

    @property
    def pairs_per_step(self) -> int:
        return self.batches[0].size


def _contrastive_batch(queries, passages, pad_id: int = 0):
    from megatron_conan.data.contrastive import ContrastiveBatch, pad_sequences

    query_ids, query_lengths = pad_sequences(queries, pad_id)
    positive_ids, positive_lengths = pad_sequences(passages, pad_id)
    import torch

    return ContrastiveBatch("pair", torch.arange(len(queries)), query_ids, query_lengths, positive_ids,
                            positive_lengths)


def random_workload(args, vocab_size: int) -> Workload:
    """`fixed` (one batch of equal lengths) or `synthetic` (a length mix) of random token ids."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(1 if args.data == "fixed" else args.batches):
        if args.data == "fixed":
            passage_lengths = [args.passage_length] * args.batch
        else:
            passage_lengths = torch.randint(args.min_passage_length, args.passage_length + 1, (args.batch,),
                                            generator=generator).tolist()
        queries = [torch.randint(4, vocab_size, (args.query_length,), generator=generator).tolist()
                   for _ in range(args.batch)]
        passages = [torch.randint(4, vocab_size, (length,), generator=generator).tolist()
                    for length in passage_lengths]
        batches.append(_contrastive_batch(queries, passages))
    longest = max(args.query_length, args.passage_length)
    lengths = (f"{args.query_length}/{args.passage_length}" if args.data == "fixed" else
               f"{args.query_length} / {args.min_passage_length}-{args.passage_length} (uniform)")
    return Workload(f"{args.data} random ids, query/passage tokens {lengths}", batches,
                    {"max_sequence_length": longest}, {})


def quickstart_workload(args) -> Workload:
    """Batches of the main job's stage-3 pairs, tokenized, instructed and cut as its stage 3 does."""
    from megatron_conan.data.contrastive import ContrastiveLoader
    from megatron_conan.data.tokenizer import ConanTokenizer
    from megatron_conan.config.run import load_run_config
    from megatron_conan.jobs.workspace import stage_dir

    config_path = os.path.join(stage_dir(args.work_dir, "embed-weak"), "config.yaml")
    if not os.path.isfile(config_path):
        raise SystemExit(f"embed_step: error: no {config_path}: run the main job first "
                         f"(python -m megatron_conan.quickstart) or pass its --work-dir")
    run = load_run_config("embed-weak", config_path)  # a run's config.yaml
    embedding = run.embedding
    loader = ContrastiveLoader(run.data.contrastive_prefix, ConanTokenizer(run.data.tokenizer), args.batch,
                               seed=args.seed, max_query_length=embedding.max_query_length,
                               max_passage_length=embedding.max_passage_length, tasks=("pair",), drop_last=True)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == args.batches:
            break
    return Workload(f"the main job's stage-3 pairs ({run.data.contrastive_prefix}), query/passage cut at "
                    f"{embedding.max_query_length}/{embedding.max_passage_length}", batches,
                    dict(run.model.overrides),
                    {"pooling": embedding.pooling, "pool_prompt": embedding.pool_prompt,
                     "max_query_length": embedding.max_query_length,
                     "max_passage_length": embedding.max_passage_length})


def padding_shares(workload: Workload, max_tokens_per_row: int) -> Dict[str, float]:
    """Share of the positions the forward computes that hold no token: right-padded (each role
    padded to its longest text) and packed (`models/packing.py` rows of the step's width)."""
    from megatron_conan.models.packing import pack_batch

    tokens = padded = packed = 0
    for batch in workload.batches:
        for ids, lengths in ((batch.query_ids, batch.query_lengths), (batch.positive_ids, batch.positive_lengths)):
            tokens += int(lengths.sum())
            padded += ids.numel()
            rows = pack_batch(ids, lengths, max_tokens_per_row)
            packed += rows.input_ids.numel()
    return {"padded": 1 - tokens / padded, "packed": 1 - tokens / packed}


class _Ours:
    """The embed-weak stage fed fixed batches, one world of one process; `packing` per step."""

    def __init__(self, args, workload: Workload, run_dir: str, mini_batch_size: int, mini_batch_tokens: int = 0):
        from megatron_conan.config.loader import from_dict
        from megatron_conan.config.run import EmbeddingConfig
        from megatron_conan.training.embedding_stage import WeaklySupervisedStage
        from megatron_conan.training.trainer import Trainer

        class FedStage(WeaklySupervisedStage):
            """Fed fixed batches by step_on_batch: no store, no tokenizer."""

            def check_inputs(self, cfg, model_config):
                pass

            def setup(self, ctx):
                pass

        cfg = from_dict(EmbeddingConfig, {
            "run_dir": run_dir,
            "model": {"recipe": args.recipe, "soft_mask": {"total_steps": 1000},
                      "overrides": workload.model_overrides},
            "train": {"train_steps": 1000, "global_batch_size": workload.pairs_per_step, "precision": args.precision,
                      "eval_interval": 0},
            "optimizer": {"lr": 1e-5, "warmup_fraction": 0.0, "decay_style": "constant"},
            "data": {"kind": "contrastive", "contrastive_prefix": "unused"},
            "embedding": {**workload.embedding, "temperature": args.temperature, "mini_batch_size": mini_batch_size,
                          "mini_batch_tokens": mini_batch_tokens,
                          "max_tokens_per_row": args.max_tokens_per_row, "mask_duplicate_positives": False}})
        self.stage = FedStage()
        self.trainer = Trainer(cfg, self.stage)
        self.step_index = 0
        self.vocab_size = cfg.model.build().vocab_size

    def step(self, batch, packing: bool) -> None:
        from megatron_conan.training.megatron_step import optimizer_step, zero_grads

        ctx = self.trainer.ctx
        ctx.cfg.embedding.packing = packing  # read by the stage at every step
        zero_grads(ctx.chunks, self.trainer.optimizer)
        self.stage.step_on_batch(ctx, self.step_index, batch)
        optimizer_step(self.trainer.optimizer)
        self.step_index += 1


class _Theirs:
    """sentence-transformers training a Hugging Face Llama of the same shape."""

    def __init__(self, args, model_config, directory: str, mini_batch_size: int, mini_batch_tokens: int = 0):
        import torch
        from sentence_transformers import SentenceTransformer, losses, models
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

        shape = model_config
        config = LlamaConfig(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_query_groups, head_dim=shape.head_dim, rms_norm_eps=shape.norm_epsilon,
            rope_theta=shape.rotary_base, max_position_embeddings=shape.max_sequence_length,
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
        if mini_batch_tokens:  # chunks by true tokens (mini_batch_size is then not read)
            self.loss = losses.CachedMultipleNegativesRankingLoss(self.model, scale=scale,
                                                                  mini_batch_num_tokens=mini_batch_tokens)
        elif mini_batch_size:
            self.loss = losses.CachedMultipleNegativesRankingLoss(self.model, scale=scale, mini_batch_size=mini_batch_size)
        else:
            self.loss = losses.MultipleNegativesRankingLoss(self.model, scale=scale)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.device = device

    def step(self, batch, packing: bool = False) -> None:
        import torch

        # the same right-padded tensors, attention mask from the true lengths (what its tokenizer's
        # padding=True gives: each role padded to its longest text)
        features = [{"input_ids": ids.to(self.device),
                     "attention_mask": (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long().to(self.device)}
                    for ids, lengths in ((batch.query_ids, batch.query_lengths),
                                         (batch.positive_ids, batch.positive_lengths))]
        loss = self.loss(features, None)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def theirs_name(row: Dict) -> str:
    """The sentence-transformers loss a result row was timed against."""
    if row["mini_batch_tokens"]:
        return "CachedMNRL by tokens"
    return "CachedMNRL" if row["mini_batch_size"] else "MNRL"


def _time(trainer, batches, steps: int, synchronize, packing: bool = False) -> float:
    synchronize()
    started = time.perf_counter()
    for index in range(steps):
        trainer.step(batches[index % len(batches)], packing)
    synchronize()
    return time.perf_counter() - started


def count_collectives(ours: "_Ours", batch, packing: bool) -> Dict[str, int]:
    """Calls of each torch.distributed collective during one step of ours (zero counts left out)."""
    import torch.distributed as dist

    counts: Dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def recorded(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return call

    for name in originals:
        setattr(dist, name, recorded(name))
    try:
        ours.step(batch, packing)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    import torch

    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="conan_1p4b" if on_gpu else "tiny")
    parser.add_argument("--data", choices=("fixed", "synthetic", "quickstart"), default="fixed")
    parser.add_argument("--work-dir", default="runs/quickstart", help="the main job's work dir (--data quickstart)")
    parser.add_argument("--batch", type=int, default=64 if on_gpu else 32, help="pairs per step")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled (synthetic, quickstart)")
    parser.add_argument("--query-length", type=int, default=None,
                        help="query tokens (default: 256 fixed on a GPU, 32 fixed on CPU, 20 synthetic)")
    parser.add_argument("--passage-length", type=int, default=None,
                        help="passage tokens, the longest for synthetic (default: 512, on CPU 64 for fixed)")
    parser.add_argument("--min-passage-length", type=int, default=64, help="shortest synthetic passage")
    parser.add_argument("--packing", action="store_true", help="also time our step on packed rows")
    parser.add_argument("--max-tokens-per-row", type=int, default=512, help="packed row width (tokens)")
    parser.add_argument("--mini-batch-size", type=int, default=16 if on_gpu else 8,
                        help="GradCache chunk (ours) = CachedMNRL mini_batch_size (theirs); 0: plain only")
    parser.add_argument("--mini-batch-tokens", type=int, default=0,
                        help="also time GradCache with chunks of at most this many true tokens on both sides "
                             "(ours embedding.mini_batch_tokens, theirs mini_batch_num_tokens); 0: not timed")
    parser.add_argument("--precision", default="bf16" if on_gpu else "fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefetch", action="store_true",
                        help="time the main job's stage-3 step with its loader read ahead and not (--data quickstart)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    if args.prefetch and args.data != "quickstart":
        parser.error("--prefetch reads the main job's store: give --data quickstart")
    if args.query_length is None:
        args.query_length = 20 if args.data == "synthetic" else (256 if on_gpu else 32)
    if args.passage_length is None:
        args.passage_length = 64 if args.data == "fixed" and not on_gpu else 512
    return args


def _prefetch_trainer(args, scratch: str):
    """A stage-3 Trainer of the main job's config (fresh weights, a scratch run_dir), its loader bare."""
    from megatron_conan.config.run import load_run_config
    from megatron_conan.jobs.workspace import stage_dir
    from megatron_conan.training.embedding_stage import WeaklySupervisedStage
    from megatron_conan.training.trainer import Trainer

    config_path = os.path.join(stage_dir(args.work_dir, "embed-weak"), "config.yaml")
    if not os.path.isfile(config_path):
        raise SystemExit(f"embed_step: error: no {config_path}: run the main job first "
                         f"(python -m megatron_conan.quickstart) or pass its --work-dir")
    cfg = load_run_config("embed-weak", config_path, [f"run_dir={scratch}", "checkpoint.load_dir=null",
                                                      "train.progress_bar=false", "train.prefetch=false",
                                                      f"train.seed={args.seed}"])
    return Trainer(cfg, WeaklySupervisedStage()), cfg


def prefetch_rounds(args) -> Dict:
    """Pairs/s of the main job's stage-3 Trainer step with the read-ahead thread on and off, rounds
    interleaved in one trainer (the same model, store and batches in sequence)."""
    from megatron_conan.data.prefetch import Prefetcher

    with tempfile.TemporaryDirectory() as scratch:
        trainer, cfg = _prefetch_trainer(args, scratch)
        loader = trainer.loader

        def rate(prefetch: bool, steps: int) -> float:
            trainer.loader = Prefetcher(loader) if prefetch else loader
            started = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            seconds = time.perf_counter() - started
            if prefetch:
                trainer.loader.close()  # the bare loader goes on from the last batch a step took
            return steps * cfg.train.global_batch_size / seconds

        for prefetch in (True, False):
            rate(prefetch, args.warmup)
        rates = {"on": [], "off": []}
        for _ in range(args.rounds):
            for name in rates:
                rates[name].append(rate(name == "on", args.steps))
    ratios = [on / off for on, off in zip(rates["on"], rates["off"])]
    return {"pairs_per_step": cfg.train.global_batch_size, "store": cfg.data.contrastive_prefix,
            "packing": cfg.embedding.packing, "on_pairs_per_s": statistics.median(rates["on"]),
            "off_pairs_per_s": statistics.median(rates["off"]), "ratio_median": statistics.median(ratios),
            "ratios": ratios}


def report_prefetch(args, row: Dict) -> None:
    import torch

    print(f"stage-3 Trainer step of the main job ({args.work_dir}): {row['pairs_per_step']} pairs a step from "  # user-facing
          f"{row['store']}, packing {row['packing']}, {args.steps} steps x {args.rounds} rounds, "
          f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"prefetch on  {row['on_pairs_per_s']:8.1f} pairs/s")  # user-facing
    print(f"prefetch off {row['off_pairs_per_s']:8.1f} pairs/s")  # user-facing
    print(f"on / off {row['ratio_median']:.3f}x (median of rounds: "  # user-facing
          + " ".join(f"{ratio:.3f}" for ratio in row["ratios"]) + ")")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(row, handle, indent=2)


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    if args.prefetch:
        from megatron_conan.console import configure_logging
        from megatron_conan.distributed.parallel import destroy_parallel, init_process_group_from_env

        configure_logging(logging.WARNING)
        init_process_group_from_env()
        try:
            row = prefetch_rounds(args)
        finally:
            destroy_parallel()
        report_prefetch(args, row)
        return 0
    on_gpu = torch.cuda.is_available()
    from megatron_conan.console import configure_logging

    configure_logging(logging.WARNING)  # the figures only

    from megatron_conan.config.model import model_recipe
    from megatron_conan.distributed.parallel import destroy_parallel, init_process_group_from_env

    workload = (quickstart_workload(args) if args.data == "quickstart"
                else random_workload(args, model_recipe(args.recipe).vocab_size))
    shares = padding_shares(workload, args.max_tokens_per_row)
    layouts = ["padded", "packed"] if args.packing else ["padded"]
    init_process_group_from_env()
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    rows = []
    modes = ([("plain", 0, 0)] + ([("cached", args.mini_batch_size, 0)] if args.mini_batch_size else [])
             + ([("tokens", 0, args.mini_batch_tokens)] if args.mini_batch_tokens else []))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for label, mini_batch_size, mini_batch_tokens in modes:
                ours = _Ours(args, workload, os.path.join(scratch, f"ours_{label}"), mini_batch_size, mini_batch_tokens)
                theirs = _Theirs(args, ours.trainer.ctx.model_config, os.path.join(scratch, f"theirs_{label}"),
                                 mini_batch_size, mini_batch_tokens)
                sides = {**{layout: (ours, layout == "packed") for layout in layouts}, "theirs": (theirs, False)}
                for trainer, packing in sides.values():
                    _time(trainer, workload.batches, args.warmup, synchronize, packing)
                collectives = {layout: count_collectives(ours, workload.batches[0], layout == "packed")
                               for layout in layouts}
                rates = {name: [] for name in sides}
                for _ in range(args.rounds):
                    for name, (trainer, packing) in sides.items():
                        seconds = _time(trainer, workload.batches, args.steps, synchronize, packing)
                        rates[name].append(args.steps * workload.pairs_per_step / seconds)
                for layout in layouts:
                    ratios = [o / t for o, t in zip(rates[layout], rates["theirs"])]
                    rows.append({"mode": label, "layout": layout, "mini_batch_size": mini_batch_size,
                                 "mini_batch_tokens": mini_batch_tokens,
                                 "ours_pairs_per_s": statistics.median(rates[layout]),
                                 "theirs_pairs_per_s": statistics.median(rates["theirs"]),
                                 "ratio_median": statistics.median(ratios), "ratios": ratios,
                                 "padding_share": shares[layout], "collectives_per_step": collectives[layout]})
                if args.packing:
                    speedups = [p / d for p, d in zip(rates["packed"], rates["padded"])]
                    rows[-1]["packed_over_padded"] = statistics.median(speedups)
                del ours, theirs, sides
        world = torch.distributed.get_world_size()
    finally:
        destroy_parallel()
    import sentence_transformers

    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"stage-3 step: {args.recipe}, batch {workload.pairs_per_step} pairs, {workload.description}, "  # user-facing
          f"{args.precision}, {device}, torch {torch.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}")
    print(f"padding share of the computed positions: padded {shares['padded']:.1%}"  # user-facing
          + (f", packed {shares['packed']:.1%} (rows of {args.max_tokens_per_row} tokens)" if args.packing else ""))
    print(f"{'mode':>7} {'layout':>7} {'ours pairs/s':>13} {'ST pairs/s':>11} {'ratio':>6}  per-round ratios")  # user-facing
    for row in rows:
        print(f"{row['mode']:>7} {row['layout']:>7} {row['ours_pairs_per_s']:>13.1f} "  # user-facing
              f"{row['theirs_pairs_per_s']:>11.1f} {row['ratio_median']:>5.2f}x  "
              f"{' '.join(f'{r:.2f}' for r in row['ratios'])}  (vs {theirs_name(row)})")
    for row in rows:
        if "packed_over_padded" in row:
            print(f"{row['mode']}: packed / padded {row['packed_over_padded']:.2f}x")  # user-facing
    print(f"collectives per step (world of {world}): "  # user-facing
          + "; ".join(f"{row['mode']} {row['layout']} "
                      + (", ".join(f"{name} {count}" for name, count in sorted(row["collectives_per_step"].items()))
                         or "none")
                      for row in rows))
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
