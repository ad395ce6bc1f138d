"""Encoding throughput (texts/s): conan-encode's embedder on a checkpoint against
``SentenceTransformer.encode`` on that checkpoint's export, same texts, batch size and device.

Both sides produce the same unit vectors (checked: the minimum cosine is printed). Each round
encodes every text once per side, in chunks, the sides alternating chunk by chunk (and who goes
first) so that machine load hits both alike; throughput is reported by wall clock and by process CPU
time (steadier on a shared machine), with the median over rounds of the ratio ours / theirs.
``--packing`` adds a third side: ours on packed rows (``conan-encode --max-tokens-per-row``); the
share of padding positions of each layout is printed (both sides sort the texts by length first).

    python benchmarks/encode_throughput.py                         # builds a tiny model, CPU
    python benchmarks/encode_throughput.py --shape small --texts 1024 --batch-size 64 --packing
    python benchmarks/encode_throughput.py --checkpoint runs/embed_sup --export out/conan-embedder --device cuda

Texts: paragraphs of Python's own documentation (pydoc topics), 1 to ``--max-length`` tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

from megatron_conan.console import set_offline_switches

set_offline_switches()  # before sentence-transformers loads: nothing here downloads

SHAPES = {
    "tiny": {},
    "small": {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "num_query_groups": 4,
              "head_dim": 32, "ffn_hidden_size": 704, "max_sequence_length": 512},
}
"""Model shapes the benchmark can build (fields over the tiny recipe)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="an embedding checkpoint (default: build one of --shape)")
    parser.add_argument("--export", help="its sentence-transformers export (default: export --checkpoint)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text, both sides")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=128,
                        help="texts per timed call; the two sides alternate chunk by chunk (load hits both alike)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="both sides' weights and activations (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--packing", action="store_true", help="also time ours on packed rows")
    parser.add_argument("--max-tokens-per-row", type=int, default=512, help="packed row width (tokens)")
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args(argv)


def build_models(args, work_dir: str):
    """(checkpoint, export) paths: the given ones, or a freshly built model of --shape and its export."""
    from megatron_conan.config.model import ConanModelConfig, tiny
    from megatron_conan.conversion.export import export_sentence_transformer
    from megatron_conan.testing.fixtures import (
        copy_checkpoint_with_extra,
        embedding_run_config,
        make_tiny_checkpoints,
        soft_mask_state,
        train_tiny_tokenizer,
    )

    checkpoint = args.checkpoint
    if checkpoint is None:
        from dataclasses import asdict

        model_config = ConanModelConfig(**{**asdict(tiny()), **SHAPES[args.shape]})
        tokenizer = train_tiny_tokenizer(os.path.join(work_dir, "tokenizer"))
        made = make_tiny_checkpoints(os.path.join(work_dir, "lm"), tokenizer, layouts={"tp1": (1, 1)},
                                     model_config=model_config)
        checkpoint = copy_checkpoint_with_extra(made["paths"]["tp1"], os.path.join(work_dir, "embedder"),
                                                soft_mask=soft_mask_state(fixed_a=1.0),
                                                run_config=embedding_run_config(tokenizer))
    export = args.export or export_sentence_transformer(checkpoint, os.path.join(work_dir, "export"),
                                                        max_seq_length=args.max_length)
    return checkpoint, export


def benchmark_texts(count: int):
    from megatron_conan.testing.tiny_models import pydoc_texts

    texts = []
    for text in pydoc_texts():
        texts.append(text)
        if len(texts) == count:
            return texts
    return (texts * (count // max(len(texts), 1) + 1))[:count]


def _timed(encode, texts, device: str):
    """(wall seconds, process CPU seconds) of one encode call."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    encode(texts)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def padding_shares(lengths, chunk: int, batch_size: int, max_tokens_per_row: int) -> dict:
    """Share of the computed positions that hold no token when each timed chunk of texts is sorted
    by length and cut into batches of `batch_size`: right-padded to each batch's longest, and
    packed (`models/packing.py` rows)."""
    from megatron_conan.models.packing import first_fit_rows

    padded = packed = 0
    for first in range(0, len(lengths), chunk):
        ordered = sorted(lengths[first:first + chunk], reverse=True)
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start:start + batch_size]
            width = max(max_tokens_per_row, batch[0])
            padded += len(batch) * batch[0]
            packed += len(first_fit_rows(batch, width)) * width
    tokens = sum(lengths)
    return {"padded": 1 - tokens / padded, "packed": 1 - tokens / packed}


def run(args) -> dict:
    import numpy
    import torch
    from sentence_transformers import SentenceTransformer

    from megatron_conan.eval.embedders import CheckpointEmbedder

    texts = benchmark_texts(args.texts)
    names = ["ours", "ours packed", "theirs"] if args.packing else ["ours", "theirs"]
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    with tempfile.TemporaryDirectory(prefix="encode_bench_") as work_dir:
        checkpoint, export = build_models(args, work_dir)
        with contextlib.ExitStack() as stack:
            ours = stack.enter_context(CheckpointEmbedder(checkpoint, max_length=args.max_length, device=args.device,
                                                          precision=precision))
            sides = {"ours": lambda chunk: ours.encode(chunk, batch_size=args.batch_size)}
            if args.packing:  # a second model only when it is timed
                ours_packed = stack.enter_context(CheckpointEmbedder(
                    checkpoint, max_length=args.max_length, device=args.device, precision=precision,
                    max_tokens_per_row=args.max_tokens_per_row))
                sides["ours packed"] = lambda chunk: ours_packed.encode(chunk, batch_size=args.batch_size)
            theirs = SentenceTransformer(export, device=args.device, local_files_only=True)
            theirs.max_seq_length = args.max_length
            theirs.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision])
            sides["theirs"] = lambda chunk: theirs.encode(chunk, batch_size=args.batch_size, convert_to_numpy=True)
            lengths = [len(ids) for ids in ours.tokenize(texts, "")]
            vectors = {name: encode(texts) for name, encode in sides.items()}  # + warm-up
            minimum_cosine = {name: float((vectors[name] * vectors["theirs"]).sum(axis=1).min())
                              for name in names if name != "theirs"}
            rounds = []
            for round_index in range(args.rounds):
                totals = {name: [0.0, 0.0] for name in sides}
                for start in range(0, len(texts), args.chunk):
                    chunk = texts[start:start + args.chunk]
                    shift = (round_index + start // args.chunk) % len(names)
                    for name in names[shift:] + names[:shift]:  # rotate who goes first, chunk by chunk
                        wall, cpu = _timed(sides[name], chunk, args.device)
                        totals[name][0] += wall
                        totals[name][1] += cpu
                rounds.append(totals)
    per_round = {name: {"wall": [len(texts) / totals[name][0] for totals in rounds],
                        "cpu": [len(texts) / totals[name][1] for totals in rounds]} for name in names}
    ratios = {name: {clock: [o / t for o, t in zip(per_round[name][clock], per_round["theirs"][clock])]
                     for clock in ("wall", "cpu")} for name in names if name != "theirs"}
    return {"texts": len(texts), "batch_size": args.batch_size, "max_length": args.max_length, "chunk": args.chunk,
            "device": args.device, "precision": precision, "shape": args.shape if args.checkpoint is None else checkpoint,
            "torch_threads": torch.get_num_threads(), "minimum_cosine": minimum_cosine,
            "mean_tokens": float(numpy.mean(lengths)), "max_tokens_per_row": args.max_tokens_per_row,
            "padding_share": padding_shares(lengths, args.chunk, args.batch_size, args.max_tokens_per_row),
            "texts_per_s": {name: {clock: statistics.median(values) for clock, values in clocks.items()}
                            for name, clocks in per_round.items()},
            "ratio_median": {name: {clock: statistics.median(values) for clock, values in clocks.items()}
                             for name, clocks in ratios.items()},
            "ratios": ratios}


def main(argv=None) -> int:
    args = parse_args(argv)
    figures = run(args)
    print(f"conan-encode vs SentenceTransformer.encode: {figures['texts']} texts, batch {figures['batch_size']}, "
          f"max length {figures['max_length']} (mean {figures['mean_tokens']:.0f} tokens), {figures['device']}, "
          f"{figures['precision']}, "
          f"{figures['torch_threads']} threads, {args.rounds} rounds")  # user-facing
    shares = figures["padding_share"]
    print(f"  padding share of the computed positions: padded {shares['padded']:.1%}"  # user-facing
          + (f", packed {shares['packed']:.1%} (rows of {args.max_tokens_per_row} tokens)" if args.packing else ""))
    for clock, label in (("wall", "wall clock"), ("cpu", "process CPU time")):
        rates = figures["texts_per_s"]
        print(f"  {label}: theirs {rates['theirs'][clock]:8.1f} texts/s")  # user-facing
        for name, ratios in figures["ratios"].items():
            print(f"  {label}: {name:>11} {rates[name][clock]:8.1f} texts/s, ratio "  # user-facing
                  f"{figures['ratio_median'][name][clock]:.2f}x (rounds: "
                  + ", ".join(f"{ratio:.2f}" for ratio in ratios[clock]) + ")")
    print("  same vectors: min cosine " + ", ".join(  # user-facing
        f"{name} {value:.6f}" for name, value in figures["minimum_cosine"].items()))
    if args.json:
        from megatron_conan.eval.text_io import save_json

        save_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
