"""JSONL -> megatron-core indexed dataset (.bin/.idx), or merge of such shards.

    python tools/preprocess_data.py --input a.jsonl b.jsonl.zst --output-prefix data/web \
        --tokenizer-model tok.model --workers 16
    python tools/preprocess_data.py --format sft --input sft.jsonl --output-prefix data/sft ...
    python tools/preprocess_data.py --merge data/web_0 data/web_1 --output-prefix data/web

Exit status: 0 on success, 2 when --strict stopped at a bad line, 1 when no line was usable; no
output is left on failure.
"""

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as `python tools/preprocess_data.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst)")
    source.add_argument("--merge", nargs="+", metavar="PREFIX",
                        help="merge these indexed datasets (same dtype) into --output-prefix")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-model", help="SentencePiece .model (required with --input)")
    parser.add_argument("--format", choices=("text", "sft", "contrastive"), default="text")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto")
    parser.add_argument("--max-line-bytes", type=int, default=16 << 20)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line")
    parser.add_argument("--max-bad-line-examples", type=int, default=10)
    parser.add_argument("--batch-lines", type=int, default=1024)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-json", help="also write the final report as JSON here")
    args = parser.parse_args(argv)
    if args.input and not args.tokenizer_model:
        parser.error("--tokenizer-model is required with --input")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from megatron_conan.data.indexed import merge_indexed_datasets
    from megatron_conan.data.preprocess import PreprocessConfig, run_and_report

    if args.merge:
        writer = merge_indexed_datasets(args.merge, args.output_prefix)
        print(f"merged {len(args.merge)} shards into {args.output_prefix}: "
              f"{writer.num_documents:,} documents, {writer.num_tokens:,} tokens")
        return 0
    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model, format=args.format, json_key=args.json_key,
        workers=args.workers, dtype=args.dtype, max_line_bytes=args.max_line_bytes,
        strict=args.strict, max_bad_line_examples=args.max_bad_line_examples,
        batch_lines=args.batch_lines, progress=not args.no_progress)
    return run_and_report(config, args.report_json)


if __name__ == "__main__":
    sys.exit(main())
