"""conan-train-tokenizer: trains the project's SentencePiece tokenizer (BPE, byte fallback) on a
sample of JSONL or text.

    conan-train-tokenizer --input data/*.jsonl.zst --model-prefix tok/conan \
        --vocab-size 150000 --max-sentences 5000000

Writes <model-prefix>.model and .vocab. Files ending in .jsonl[.gz|.zst] are read as JSONL
(--json-key), others as plain text, one sample per line.
"""

import argparse
import logging
import sys

from megatron_conan.console import command_parser, run_command
from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer
from megatron_conan.outputs import add_overwrite_argument, check_output_files

PROG = "conan-train-tokenizer"


def parse_args(argv=None) -> argparse.Namespace:
    defaults = TokenizerTrainingConfig()
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--model-prefix", required=True)
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--character-coverage", type=float, default=defaults.character_coverage)
    parser.add_argument("--num-reserved", type=int, default=defaults.num_reserved)
    parser.add_argument("--json-key", default=defaults.json_key)
    parser.add_argument("--max-sentences", type=int, default=defaults.max_sentences)
    parser.add_argument("--max-sentence-length", type=int, default=defaults.max_sentence_length)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-threads", type=int, default=defaults.num_threads)
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Bad input (missing files, bad options, malformed data) ends in one stderr line, status 2."""
    return run_command(_main, argv, prog=PROG, log_level=logging.INFO)


def _main(argv) -> int:
    args = parse_args(argv)
    check_output_files([args.model_prefix + ".model", args.model_prefix + ".vocab"], args.input, args.overwrite,
                       creates_parent=True)
    config = TokenizerTrainingConfig(
        vocab_size=args.vocab_size, character_coverage=args.character_coverage,
        num_reserved=args.num_reserved, json_key=args.json_key,
        max_sentences=args.max_sentences, max_sentence_length=args.max_sentence_length,
        seed=args.seed, num_threads=args.num_threads)
    report = train_tokenizer(args.input, args.model_prefix, config)
    print(f"wrote {args.model_prefix}.model ({args.vocab_size} pieces)\n{report.format()}")  # user-facing
    return 0


if __name__ == "__main__":
    sys.exit(main())
