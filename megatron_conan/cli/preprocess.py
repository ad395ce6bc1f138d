"""conan-preprocess: JSONL -> megatron-core indexed dataset (.bin/.idx + tokenizer record .meta.json),
or merge.

    conan-preprocess --input a.jsonl b.jsonl.zst --output-prefix data/web \
        --tokenizer-model tok.model --workers 16
    conan-preprocess --format sft --input sft.jsonl --output-prefix data/sft ...
    conan-preprocess --merge data/web_0 data/web_1 --output-prefix data/web

Exit status: 0 on success; 2 with one line on stderr for bad input: missing files or options,
--strict stopped at a bad line, no usable line, or more bad lines than --max-bad-fraction (that
run's output is written; the others leave none). The report (documents, bad lines by kind and
their first locations) is printed in every case.
"""

import argparse
import sys

from megatron_conan.console import command_parser, run_command
from megatron_conan.data.indexed import merge_indexed_datasets
from megatron_conan.outputs import add_overwrite_argument, check_output_files
from megatron_conan.preprocess.jsonl_to_indexed import (
    PreprocessConfig,
    dataset_outputs,
    preprocess_jsonl,
    run_and_report,
)

PROG = "conan-preprocess"


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser(PROG, __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst)")
    source.add_argument("--merge", nargs="+", metavar="PREFIX",
                        help="merge these indexed datasets (same dtype and tokenizer) into "
                             "--output-prefix")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-model", help="SentencePiece .model (required with --input)")
    parser.add_argument("--format", choices=("text", "sft", "contrastive"), default="text",
                        help="contrastive: the store of conan-tokenize-contrastive")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="SentencePiece threads per worker (default 0: cores / workers)")
    parser.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto")
    parser.add_argument("--max-line-bytes", type=int, default=16 << 20)
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad line, writing no output")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail (exit 2, output still written) when more than this share of "
                             "lines is bad (default 0.01)")
    parser.add_argument("--max-bad-line-examples", type=int, default=10)
    parser.add_argument("--verify-sample", type=int, default=0, metavar="N",
                        help="re-encode N random documents with plain SentencePiece and fail "
                             "on any difference (before the output is committed)")
    parser.add_argument("--no-word-cache", action="store_true",
                        help="encode with plain SentencePiece (the output is the same)")
    parser.add_argument("--cache-mb", type=int, default=256,
                        help="memory bound of each worker's word cache (MiB)")
    parser.add_argument("--batch-lines", type=int, default=1024)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-json", help="also write the final report as JSON here")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.input and not args.tokenizer_model:
        parser.error("--tokenizer-model is required with --input")
    return args


def main(argv=None) -> int:
    """Bad input ends in one stderr line and exit status 2."""
    return run_command(_main, argv, prog=PROG)


def _main(argv) -> int:
    args = parse_args(argv)
    run, extra = preprocess_jsonl, []
    if args.format == "contrastive":
        # Imported here, not at the top: it needs the shared tokenizer class and so megatron-core
        # and torch (~4 s per process on 2 cores). Spawned workers import this module again, and
        # the text, SFT and merge paths need neither.
        from megatron_conan.preprocess.contrastive_tokenize import EXAMPLES_SUFFIX, tokenize_contrastive

        run, extra = tokenize_contrastive, [EXAMPLES_SUFFIX]
    inputs = [path for prefix in args.merge for path in dataset_outputs(prefix)] if args.merge else args.input
    check_output_files(dataset_outputs(args.output_prefix, extra) + [args.report_json],
                       inputs + [args.tokenizer_model], args.overwrite, creates_parent=True)
    if args.merge:
        writer = merge_indexed_datasets(args.merge, args.output_prefix)
        print(f"merged {len(args.merge)} shards into {args.output_prefix}: "  # user-facing
              f"{writer.num_documents:,} documents, {writer.num_tokens:,} tokens")
        return 0
    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model, format=args.format, json_key=args.json_key,
        workers=args.workers, threads=args.threads, dtype=args.dtype,
        max_line_bytes=args.max_line_bytes, strict=args.strict,
        max_bad_fraction=args.max_bad_fraction, max_bad_line_examples=args.max_bad_line_examples,
        verify_sample=args.verify_sample, word_cache=not args.no_word_cache,
        cache_mb=args.cache_mb, batch_lines=args.batch_lines, progress=not args.no_progress)
    return run_and_report(config, args.report_json, run)


if __name__ == "__main__":
    sys.exit(main())
