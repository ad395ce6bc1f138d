"""conan-sft-to-pairs: SFT JSONL (instruction, input?, output) -> stage-3 pair JSONL, optionally
teacher-filtered.

    conan-sft-to-pairs --input sft.jsonl --output pairs.jsonl \
        --teacher models/teacher --min-score 0.4

The query is the instruction, joined with the input by a newline when there is one; the positive
is the output. With --teacher (a local sentence-transformers directory, loaded offline), pairs it
scores below --min-score are dropped and counted in the report. Bad lines are counted with their
file:line. The output is written atomically; bad input ends in one stderr line and status 2.
"""

import argparse
import sys

from megatron_conan.console import command_parser, run_command
from megatron_conan.datagen.sft_pairs import SFTPairsConfig, sft_to_pairs
from megatron_conan.outputs import add_overwrite_argument, check_output_files
from megatron_conan.preprocess.jsonl_to_indexed import write_report_json

PROG = "conan-sft-to-pairs"


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--input", nargs="+", required=True, help="SFT JSONL (.gz/.zst too)")
    parser.add_argument("--output", required=True, help="pair JSONL to write")
    parser.add_argument("--teacher", help="local sentence-transformers model directory")
    parser.add_argument("--min-score", type=float, default=0.4)
    parser.add_argument("--batch-size", type=int, default=64, help="teacher batch size")
    parser.add_argument("--device", help="teacher device (default: sentence-transformers' choice)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-json", help="also write the report as JSON here")
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Bad input (missing files, a teacher that is not a model) ends in one stderr line, status 2."""
    return run_command(_main, argv, prog=PROG)


def _main(argv) -> int:
    args = parse_args(argv)
    check_output_files([args.output, args.report_json], [*args.input, args.teacher], args.overwrite,
                       creates_parent=True)
    report = sft_to_pairs(SFTPairsConfig(
        inputs=args.input, output=args.output, teacher=args.teacher, min_score=args.min_score,
        teacher_batch_size=args.batch_size, device=args.device, progress=not args.no_progress))
    print(report.format())  # user-facing
    if args.report_json:
        write_report_json(report, args.report_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
