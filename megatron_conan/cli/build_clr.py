"""conan-build-clr: retrieval JSONL -> cross-lingual retrieval (clr) JSONL: queries translated into
the paper's 26 languages (docs/DESIGN.md section 7), passages untouched.

    conan-build-clr --input retrieval.jsonl --output clr.jsonl --seed 0 \
        --translator http --base-url http://127.0.0.1:8000/v1 --model qwen2.5-7b-instruct \
        --api-key-env OPENAI_API_KEY --concurrency 8
    conan-build-clr ... --translator hf --model-dir models/nllb
    conan-build-clr ... --translator table --table translations.jsonl

Each row's language is drawn from (seed, row key); rows whose target is the query's own language
(English for an English source) keep the original query. Resumable: a re-run continues from
<output>.progress.jsonl and retries failed rows. Failed rows are listed with their reason; the
output is written atomically once every row is done.
"""

import argparse
import os
import sys

from megatron_conan.console import command_parser, run_command
from megatron_conan.datagen import clr
from megatron_conan.outputs import add_overwrite_argument, check_output_files
from megatron_conan.preprocess.jsonl_to_indexed import write_report_json

PROG = "conan-build-clr"


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--input", nargs="+", required=True, help="retrieval JSONL files")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source-language", default="en",
                        help="the queries' language when a row has no `language`")
    parser.add_argument("--translator", choices=("table", "hf", "http"), required=True)
    parser.add_argument("--table", help="table: JSONL of {text, language, translation}")
    parser.add_argument("--model-dir", help="hf: a local Hugging Face model directory")
    parser.add_argument("--device", default="cpu", help="hf: torch device")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--base-url", help="http: the endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="http: the model name")
    parser.add_argument("--api-key-env", help="http: environment variable holding the API key")
    parser.add_argument("--allow-insecure-http", action="store_true",
                        help="http: allow a plain http:// --base-url on another host (the key and the queries "
                             "then cross the network unencrypted; default: https, or http to this host only)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--retries", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=60.0, help="http: seconds per request")
    parser.add_argument("--backoff", type=float, default=1.0, help="http: first retry delay, s")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-json", help="also write the report as JSON here")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    needed = {"table": ("table",), "hf": ("model_dir",), "http": ("base_url", "model")}
    for name in needed[args.translator]:
        if getattr(args, name) is None:
            parser.error(f"--translator {args.translator} needs --{name.replace('_', '-')}")
    return args


def main(argv=None) -> int:
    """Bad input ends in one stderr line and status 2; failed rows end in status 1."""
    return run_command(_main, argv, prog=PROG)


def _main(argv) -> int:
    args = parse_args(argv)
    # a run with failed rows left its output and a progress file: re-running the command resumes it
    resuming = os.path.exists(clr.CLRConfig.progress_file(args.output))
    check_output_files([args.output, args.report_json], [*args.input, args.table, args.model_dir],
                       args.overwrite or resuming, creates_parent=True)
    if args.translator == "table":
        translator = clr.TableTranslator(args.table)
    elif args.translator == "hf":
        translator = clr.HFModelTranslator(args.model_dir, args.max_new_tokens, args.device)
    else:
        translator = clr.HTTPTranslator(args.base_url, args.model, args.api_key_env,
                                        args.concurrency, args.retries, args.timeout, args.backoff,
                                        allow_insecure_http=args.allow_insecure_http)
    report = clr.build_clr(clr.CLRConfig(args.input, args.output, seed=args.seed,
                                         source_language=args.source_language,
                                         progress=not args.no_progress), translator)
    print(report.format())  # user-facing
    if args.report_json:
        write_report_json(report, args.report_json)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
