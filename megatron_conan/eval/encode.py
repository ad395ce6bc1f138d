"""conan-encode: texts -> embeddings (.npy), from one of our checkpoints or an exported directory.

    conan-encode runs/embed_sup --input passages.jsonl --output passages.npy
    conan-encode out/conan-embedder --input questions.txt --output q.npy --prompt query --dim 512

The model is a run directory, a checkpoints directory, an iter_N directory or an exported
sentence-transformers directory. Input: JSONL (``--text-field``, default ``text``) or plain text,
one text per line; row i of the output is the embedding of text i (float32, unit norm, ``--dim``
features: a Matryoshka prefix re-normalised).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from megatron_conan.console import command_parser, run_command
from megatron_conan.eval.embedders import PROMPT_NAMES, load_embedder
from megatron_conan.eval.text_io import read_texts, save_npy
from megatron_conan.outputs import add_overwrite_argument, check_output_files


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the tools that load an embedder."""
    parser.add_argument("--tokenizer", help="SentencePiece model (checkpoints; default: the run's data.tokenizer)")
    parser.add_argument("--max-length", type=int,
                        help="tokens per text, EOD included (checkpoints; default: the run's embedding.max_passage_length, "
                             "else 512, at most the context)")
    parser.add_argument("--pooling", choices=("mean", "last", "first"), help="checkpoints; default: the run's")
    parser.add_argument("--query-instruction", help="instruction of the query prompt (checkpoints; default: the run's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument("--max-tokens-per-row", type=int,
                        help="checkpoints: run each batch as packed rows of this many tokens instead of padded "
                             "(same vectors; default: padded)")
    parser.add_argument("--dim", type=int, help="Matryoshka dim: keep the first DIM features, re-normalised")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def embedder_options(args: argparse.Namespace) -> dict:
    return {"tokenizer": args.tokenizer, "max_length": args.max_length, "pooling": args.pooling,
            "query_instruction": args.query_instruction, "device": args.device,
            "max_tokens_per_row": args.max_tokens_per_row}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = command_parser("conan-encode", __doc__)
    parser.add_argument("model", help="run / checkpoints / iter_N directory, or an exported directory")
    parser.add_argument("--input", required=True, help="JSONL (.jsonl[.gz|.zst]) or a text file, one text per line")
    parser.add_argument("--output", required=True, help=".npy file to write")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")
    parser.add_argument("--prompt", choices=PROMPT_NAMES, default="none",
                        help="query: the instruction prompt; document / none: no prompt (default none)")
    add_model_arguments(parser)
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input (missing model or input file, malformed lines, a bad dim) ends in one stderr line
    and exit status 2."""
    return run_command(_main, argv, prog="conan-encode", log_level=logging.INFO)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    check_output_files([args.output], [args.model, args.input, args.tokenizer], args.overwrite)
    texts = read_texts(args.input, args.text_field)
    with load_embedder(args.model, **embedder_options(args)) as embedder:
        embeddings = embedder.encode(texts, prompt_name=args.prompt, batch_size=args.batch_size, dim=args.dim,
                                     show_progress=not args.no_progress)
    save_npy(args.output, embeddings)
    print(f"wrote {args.output}: {embeddings.shape[0]} x {embeddings.shape[1]} float32")  # user-facing
    return 0


if __name__ == "__main__":
    sys.exit(main())
