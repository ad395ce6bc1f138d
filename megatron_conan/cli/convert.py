"""conan-convert: converts checkpoints between our Megatron format, Hugging Face and
sentence-transformers.

    conan-convert to-hf runs/sft out/conan-1p4b-hf
    conan-convert from-hf out/conan-1p4b-hf ckpt/imported --tensor-parallel 2
    conan-convert to-sentence-transformers runs/embed_sup out/conan-embedder

A checkpoint is a run directory, its checkpoints directory (the newest, by `latest`) or one
iter_N directory, written under any TP/PP layout. Outputs appear whole at the end (written to a
temporary directory first); an existing output is refused unless --overwrite. Formats and options:
megatron_conan/conversion/README.md.
"""

import argparse
import logging
import sys

from megatron_conan.console import command_parser, run_command
from megatron_conan.conversion import export

PROG = "conan-convert"


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser(PROG, __doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    to_hf = commands.add_parser("to-hf", help="Megatron checkpoint -> HF LlamaForCausalLM directory")
    to_st = commands.add_parser("to-sentence-transformers", help="embedding checkpoint -> sentence-transformers")
    for sub in (to_hf, to_st):
        sub.add_argument("checkpoint", help="run dir, checkpoints dir or iter_N dir")
        sub.add_argument("output", help="directory to create")
        sub.add_argument("--tokenizer", help="SentencePiece model (default: the run config's data.tokenizer)")
        sub.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                         help="weights dtype of the export (default fp32: lossless)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    to_st.add_argument("--pooling", choices=("mean", "last", "first"), help="default: the run's")
    to_st.add_argument("--query-instruction", help="instruction of the `query` prompt (default: the run's)")
    to_st.add_argument("--matryoshka-dims", type=int, nargs="+",
                       help="default: the run's, else docs/DESIGN.md section 5's")
    to_st.add_argument("--max-seq-length", type=int,
                       help="tokens per text (default 512, or the model's context if shorter)")

    from_hf = commands.add_parser("from-hf", help="HF Llama directory -> Megatron checkpoint at a TP/PP")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("output", help="checkpoints directory to create (use it as checkpoint.load_dir)")
    from_hf.add_argument("--tensor-parallel", type=int, default=1)
    from_hf.add_argument("--pipeline-parallel", type=int, default=1)
    from_hf.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Bad input (missing or mismatched checkpoints, unknown models, existing outputs) ends in one
    stderr line and exit status 2."""
    return run_command(_main, argv, prog=PROG, log_level=logging.INFO)


def _main(argv) -> int:
    args = parse_args(argv)
    if args.command == "to-hf":
        written = export.export_hf(args.checkpoint, args.output, tokenizer=args.tokenizer, dtype=args.dtype,
                                   overwrite=args.overwrite)
    elif args.command == "from-hf":
        written = export.import_hf(args.hf_dir, args.output, tensor_parallel=args.tensor_parallel,
                                   pipeline_parallel=args.pipeline_parallel, overwrite=args.overwrite)
    else:
        written = export.export_sentence_transformer(
            args.checkpoint, args.output, tokenizer=args.tokenizer, pooling=args.pooling,
            query_instruction=args.query_instruction, matryoshka_dims=args.matryoshka_dims,
            max_seq_length=args.max_seq_length, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {written}")  # user-facing
    return 0


if __name__ == "__main__":
    sys.exit(main())
