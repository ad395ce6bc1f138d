"""Hard-negative mining throughput (queries/s): ours (``megatron_conan.datagen.mining``, the library of
tools/mine_hard_negatives.py) against sentence-transformers' ``util.mine_hard_negatives``, with the
same model, corpus, batch size and rules (skip the top ranks, keep the next K), in one process.

    python benchmarks/mine_hard_negatives.py                       # builds a tiny model, CPU
    python benchmarks/mine_hard_negatives.py --export out/teacher --pairs 20000 --device cuda

Pairs: (first words, rest) of paragraphs of Python's own documentation (pydoc topics); the corpus is
the positives. Both sides encode queries and corpus and search exactly (sentence-transformers
without faiss); each round times both, alternating who goes first, and the ratio ours / theirs per
round is reported with its median. The two sides' negatives are compared as sets per query.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from megatron_conan.console import set_offline_switches

set_offline_switches()  # before sentence-transformers loads: nothing here downloads


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="a sentence-transformers directory (default: build a tiny one)")
    parser.add_argument("--shape", choices=("tiny", "small"), default="tiny", help="shape of a built model")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--num-negatives", type=int, default=7)
    parser.add_argument("--skip-top", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args(argv)


def pydoc_pairs(count: int):
    """(query, positive): the first 8 words of a paragraph of 20+ words, and the rest of it."""
    from megatron_conan.testing.tiny_models import pydoc_texts

    pairs, seen = [], set()
    for text in pydoc_texts():
        words = text.split()
        if len(words) < 20 or text in seen:
            continue
        seen.add(text)
        pairs.append((" ".join(words[:8]), " ".join(words[8:])))
        if len(pairs) == count:
            break
    return pairs


def run(args) -> dict:
    import datasets
    from sentence_transformers import SentenceTransformer, util

    from megatron_conan.datagen.mining import Example, MiningConfig, mine_hard_negatives
    from megatron_conan.eval.embedders import SentenceTransformerEmbedder

    pairs = pydoc_pairs(args.pairs)
    corpus = list(dict.fromkeys(positive for _, positive in pairs))
    with tempfile.TemporaryDirectory(prefix="mining_bench_") as work_dir:
        export = args.export
        if export is None:
            from encode_throughput import build_models  # the encode benchmark's model builder

            _, export = build_models(argparse.Namespace(checkpoint=None, export=None, shape=args.shape,
                                                        max_length=256), work_dir)
        embedder = SentenceTransformerEmbedder(export, device=args.device)
        model = SentenceTransformer(export, device=args.device, local_files_only=True)
        # the same rules on both sides: the model's query prompt on queries (sentence-transformers'
        # encode_query applies it), none on the corpus, skip the top ranks, keep the next K
        config = MiningConfig(num_negatives=args.num_negatives, pool_size=args.num_negatives, skip_top=args.skip_top,
                              query_prompt="query", batch_size=args.batch_size)
        query_prefix = embedder.prompt_text("query")
        examples = [Example(line=index + 1, record={}, query=query, positive=positive, prefix=query_prefix)
                    for index, (query, positive) in enumerate(pairs)]
        dataset = datasets.Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})

        def ours():
            pools, _ = mine_hard_negatives(examples, corpus, embedder, config, work_dir)
            return {(example.query, example.positive): {corpus[index] for index in pool}
                    for example, pool in zip(examples, pools)}

        def theirs():
            mined = util.mine_hard_negatives(
                dataset, model, corpus=corpus, range_min=args.skip_top, range_max=args.skip_top + args.num_negatives + 1,
                num_negatives=args.num_negatives, sampling_strategy="top", output_format="n-tuple",
                batch_size=args.batch_size, use_faiss=False, verbose=False)
            columns = [name for name in mined.column_names if name.startswith("negative")]
            return {(row["anchor"], row["positive"]): {row[name] for name in columns} for row in mined}

        agreement = None
        rounds = []
        for round_index in range(args.rounds):
            figures = {}
            for name, mine in (("ours", ours), ("theirs", theirs))[::1 if round_index % 2 == 0 else -1]:
                started = time.perf_counter()
                result = mine()
                figures[name] = len(pairs) / (time.perf_counter() - started)
                figures[f"{name}_negatives"] = result
            if agreement is None:
                agreement = _agreement(figures["ours_negatives"], figures["theirs_negatives"])
            rounds.append({name: figures[name] for name in ("ours", "theirs")})
    ratios = [r["ours"] / r["theirs"] for r in rounds]
    return {"pairs": len(pairs), "corpus": len(corpus), "num_negatives": args.num_negatives,
            "skip_top": args.skip_top, "batch_size": args.batch_size, "device": args.device,
            "ours_queries_per_s": statistics.median(r["ours"] for r in rounds),
            "theirs_queries_per_s": statistics.median(r["theirs"] for r in rounds),
            "ratio_median": statistics.median(ratios), "ratios": ratios, "agreement": agreement}


def _agreement(ours, theirs) -> dict:
    """Mean Jaccard overlap of the two sides' negative sets over the (query, positive) pairs both
    wrote (sentence-transformers leaves out pairs with too few negatives)."""
    shared = [key for key in ours if key in theirs and ours[key] | theirs[key]]
    overlaps = [len(ours[key] & theirs[key]) / len(ours[key] | theirs[key]) for key in shared]
    return {"pairs_compared": len(shared), "mean_jaccard": sum(overlaps) / max(len(overlaps), 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    figures = run(args)
    print(f"hard-negative mining: {figures['pairs']} queries, corpus {figures['corpus']}, K {figures['num_negatives']}, "
          f"skip {figures['skip_top']}, batch {figures['batch_size']}, {figures['device']}")  # user-facing
    print(f"  ours   {figures['ours_queries_per_s']:9.1f} queries/s")  # user-facing
    print(f"  theirs {figures['theirs_queries_per_s']:9.1f} queries/s (sentence-transformers util.mine_hard_negatives)")  # user-facing
    print(f"  ratio  {figures['ratio_median']:.2f}x (per round: " + ", ".join(f"{r:.2f}" for r in figures["ratios"])
          + f"); same negatives: mean Jaccard {figures['agreement']['mean_jaccard']:.3f} over "
          f"{figures['agreement']['pairs_compared']} pairs")  # user-facing
    if args.json:
        from megatron_conan.eval.text_io import save_json

        save_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
