"""conan-tokenize-contrastive: contrastive JSONL (pair, retrieval, clr, classification, sts) ->
tokenized contrastive store.

    conan-tokenize-contrastive --input pairs.jsonl.zst --output-prefix data/pairs \
        --tokenizer-model tok/conan.model --workers 16 \
        --instruction retrieval="Given a question, retrieve passages that answer it"

A query with an instruction (the record's own `instruction`, else the --instruction of its task)
is tokenized as the one string `Instruct: {instruction}\nQuery: {query}` (sts: both texts), as a
sentence-transformers prompt is at inference.

Writes <prefix>.bin/.idx/.examples.npy/.meta.json (see megatron_conan/data/README.md). Exit
status 2 when --strict stopped at a bad line, 1 when no line was usable; no output is left on
failure.
"""

import argparse
import sys

from megatron_conan.console import command_parser, run_command
from megatron_conan.preprocess.contrastive_tokenize import EXAMPLES_SUFFIX, tokenize_contrastive
from megatron_conan.outputs import add_overwrite_argument, check_output_files
from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, dataset_outputs, run_and_report

PROG = "conan-tokenize-contrastive"


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto")
    parser.add_argument("--max-line-bytes", type=int, default=16 << 20)
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line")
    parser.add_argument("--max-bad-line-examples", type=int, default=10)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-json", help="also write the final report as JSON here")
    parser.add_argument("--instruction", action="append", default=[], metavar="TASK=TEXT",
                        help="instruction of TASK's records that have none of their own "
                             "(repeatable, one per task)")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    args.instructions = {}
    for item in args.instruction:
        task, separator, text = item.partition("=")
        if not separator or not text.strip():
            parser.error(f"--instruction {item!r}: expected TASK=TEXT")
        if task in args.instructions:
            parser.error(f"--instruction: task {task!r} given twice")
        args.instructions[task] = text
    return args


def main(argv=None) -> int:
    """Bad input (missing files, bad options, malformed data) ends in one stderr line, status 2."""
    return run_command(_main, argv, prog=PROG)


def _main(argv) -> int:
    args = parse_args(argv)
    check_output_files(dataset_outputs(args.output_prefix, [EXAMPLES_SUFFIX]) + [args.report_json],
                       [*args.input, args.tokenizer_model], args.overwrite, creates_parent=True)
    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model, format="contrastive", workers=args.workers,
        dtype=args.dtype, max_line_bytes=args.max_line_bytes, strict=args.strict,
        max_bad_line_examples=args.max_bad_line_examples, progress=not args.no_progress,
        instructions=args.instructions)
    return run_and_report(config, args.report_json, tokenize_contrastive)


if __name__ == "__main__":
    sys.exit(main())
