"""conan-eval: retrieval metrics of an embedder (and baselines) on a BEIR-layout directory.

    conan-eval data/scifact --model runs/embed_sup --baselines bm25,random --output scifact.json
    conan-eval data/scifact --model out/conan-embedder --dim 256

Reports nDCG@10, Recall@10, Recall@100 and MRR@10 computed by pytrec_eval (as MTEB does) from an
exact search over the whole corpus, as a table and (``--output``) JSON. ``--model`` is a run /
checkpoints / iter_N directory or an exported sentence-transformers directory; ``--baselines``
adds BM25 and/or a seeded random ranking on the same split.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Dict, Optional, Sequence

from megatron_conan.console import command_parser, run_command
from megatron_conan.errors import InputError
from megatron_conan.eval import retrieval
from megatron_conan.eval.beir import load_beir
from megatron_conan.eval.embedders import load_embedder
from megatron_conan.eval.encode import add_model_arguments, embedder_options
from megatron_conan.eval.metrics import METRIC_NAMES
from megatron_conan.eval.text_io import save_json
from megatron_conan.outputs import add_overwrite_argument, check_output_files


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = command_parser("conan-eval", __doc__)
    parser.add_argument("data", help="BEIR-layout directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    parser.add_argument("--model", help="run / checkpoints / iter_N directory, or an exported directory")
    parser.add_argument("--baselines", default="", help="comma-separated: bm25, random")
    parser.add_argument("--split", default="test", help="qrels split (default test)")
    parser.add_argument("--top-k", type=int, default=100, help="documents retrieved per query (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--save-runs", help="write each system's ranked documents per query as JSON here")
    add_model_arguments(parser)
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def format_table(results: Dict[str, Dict[str, Any]]) -> str:
    """A plain-text table: one row per system, the metrics in percent."""
    name_width = max([len("system")] + [len(name) for name in results])
    header = f"{'system':<{name_width}}  " + "  ".join(f"{metric:>13}" for metric in METRIC_NAMES)
    rows = [header, "-" * len(header)]
    for name, metrics in results.items():
        rows.append(f"{name:<{name_width}}  " + "  ".join(f"{100 * metrics[metric]:>13.2f}" for metric in METRIC_NAMES))
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input (a missing or malformed dataset, an unknown baseline, a missing model) ends in one
    stderr line and exit status 2."""
    return run_command(_main, argv, prog="conan-eval", log_level=logging.INFO)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    baselines = [name.strip() for name in args.baselines.split(",") if name.strip()]
    unknown = sorted(set(baselines) - set(retrieval.BASELINES))
    if unknown:
        raise InputError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(retrieval.BASELINES)}")
    if args.model is None and not baselines:
        raise InputError("nothing to evaluate: give --model and/or --baselines")
    if args.top_k < 100:
        raise InputError(f"--top-k must be >= 100 (Recall@100 needs 100 documents), got {args.top_k}")
    check_output_files([args.output, args.save_runs], [args.data, args.model, args.tokenizer], args.overwrite)
    dataset = load_beir(args.data, args.split)
    results: Dict[str, Dict[str, Any]] = {}
    runs = {}
    if args.model is not None:
        with load_embedder(args.model, **embedder_options(args)) as embedder:
            results[args.model], runs[args.model] = retrieval.evaluate_embedder(
                embedder, dataset, dim=args.dim, top_k=args.top_k, batch_size=args.batch_size,
                show_progress=not args.no_progress)
    for name in baselines:
        results[name], runs[name] = retrieval.evaluate_baseline(name, dataset, args.top_k, args.seed)
    report = {"dataset": args.data, "split": args.split, "num_queries": len(dataset.query_ids),
              "num_documents": len(dataset.doc_ids), "results": results}
    if args.output:
        save_json(args.output, report)
    if args.save_runs:
        save_json(args.save_runs, runs)
    print(f"{args.data} ({args.split}): {len(dataset.query_ids)} queries, {len(dataset.doc_ids)} documents")  # user-facing
    print(format_table(results))  # user-facing
    return 0


if __name__ == "__main__":
    sys.exit(main())
