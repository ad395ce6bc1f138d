"""conan-mine: mines hard negatives for (query, positive) examples: the `negatives` + ranked
`candidates` that the contrastive store and DHNM read (docs/DESIGN.md section 6).

    conan-mine --input pairs.jsonl --output mined.jsonl --model out/teacher-st \
        --corpus passages.jsonl --num-negatives 7 --pool-size 32 --skip-top 5 --relative-margin 0.05

--model is a sentence-transformers directory or one of our checkpoints (run / checkpoints / iter_N
directory, embedded by our own embedder). Input records are contrastive JSONL of task pair,
retrieval or clr; the corpus defaults to the examples' positives. Writes the output atomically and
a report (<output>.report.json) naming the examples whose pool is too small. Rules and formats:
megatron_conan/datagen/mining.py and megatron_conan/datagen/README.md.
"""

import argparse
import logging
import sys

from megatron_conan.console import command_parser, run_command
from megatron_conan.datagen.mining import MiningConfig, mine_file, read_examples
from megatron_conan.errors import InputError
from megatron_conan.eval.embedders import load_embedder
from megatron_conan.eval.encode import add_model_arguments, embedder_options
from megatron_conan.outputs import add_overwrite_argument, check_output_files

PROG = "conan-mine"


def parse_args(argv=None) -> argparse.Namespace:
    defaults = MiningConfig()
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--input", required=True, help="contrastive JSONL with query and positive")
    parser.add_argument("--output", required=True, help="JSONL to write (input records + negatives, candidates)")
    parser.add_argument("--model", required=True, help="sentence-transformers directory or one of our checkpoints")
    parser.add_argument("--corpus", help="texts to mine from (JSONL or lines; default: the positives)")
    parser.add_argument("--corpus-field", default="text", help="JSONL field of the corpus texts (default text)")
    parser.add_argument("--report", help="report JSON (default <output>.report.json)")
    parser.add_argument("--num-negatives", type=int, default=defaults.num_negatives)
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size)
    parser.add_argument("--skip-top", type=int, default=defaults.skip_top)
    parser.add_argument("--max-score", type=float)
    parser.add_argument("--absolute-margin", type=float)
    parser.add_argument("--relative-margin", type=float)
    parser.add_argument("--search-depth", type=int)
    parser.add_argument("--search", choices=("auto", "exact", "ann"), default=defaults.search,
                        help=f"auto (default): approximate (faiss, the `ann` extra) from --ann-min-corpus texts on "
                             f"({defaults.ann_min_corpus:,}), exact below")
    parser.add_argument("--ann-min-corpus", type=int, default=defaults.ann_min_corpus)
    parser.add_argument("--ann-lists", type=int, help="inverted lists of the approximate index (default ~4 sqrt(N))")
    parser.add_argument("--ann-probe", type=int, default=defaults.ann_probe, help="lists searched per query")
    parser.add_argument("--ann-encoding", choices=("fp16", "sq8"), default=defaults.ann_encoding)
    parser.add_argument("--query-prompt", choices=("query", "none"), default=defaults.query_prompt,
                        help="prompt of queries without their own instruction (default query)")
    add_model_arguments(parser)
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Bad input (malformed records, a missing model, bad options) ends in one stderr line, status 2."""
    return run_command(_main, argv, prog=PROG, log_level=logging.INFO)


def _main(argv) -> int:
    args = parse_args(argv)
    if args.dim is not None:
        raise InputError("--dim does not apply to mining: pools are ranked with the full embedding")
    config = MiningConfig(num_negatives=args.num_negatives, pool_size=args.pool_size, skip_top=args.skip_top,
                          max_score=args.max_score, absolute_margin=args.absolute_margin,
                          relative_margin=args.relative_margin, search_depth=args.search_depth,
                          query_prompt=args.query_prompt, batch_size=args.batch_size, search=args.search,
                          ann_min_corpus=args.ann_min_corpus, ann_lists=args.ann_lists, ann_probe=args.ann_probe,
                          ann_encoding=args.ann_encoding)
    check_output_files([args.output, args.report or args.output + ".report.json"],
                       [args.input, args.corpus, args.model, args.tokenizer], args.overwrite)
    examples = read_examples(args.input)  # bad input fails before a model is loaded
    with load_embedder(args.model, **embedder_options(args)) as embedder:
        report = mine_file(args.input, args.output, embedder, config, corpus_path=args.corpus,
                           corpus_field=args.corpus_field, report_path=args.report,
                           show_progress=not args.no_progress, examples=examples)
    too_few = report["too_few_negatives"]
    lines = f" (lines {', '.join(str(item['line']) for item in too_few['examples'])})" if too_few["count"] else ""
    print(f"wrote {args.output}: {report['examples']} examples, mean pool {report['mean_pool_size']:.1f}; "  # user-facing
          f"{too_few['count']} with fewer than {config.num_negatives} negatives{lines}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
