"""conan-build-pydoc-corpus: Python's own documentation -> corpora for every stage and a held-out
BEIR retrieval split.

    conan-build-pydoc-corpus --output-dir data/pydoc
    conan-build-pydoc-corpus --output-dir data/pydoc seed=1 heldout_documents=500 \
        pretrain_target_bytes=200000000

Writes pretrain.jsonl, sft.jsonl, pairs.jsonl, retrieval.jsonl, corpus.jsonl, sts.jsonl,
classification.jsonl, heldout/{corpus.jsonl,queries.jsonl,qrels/test.tsv} and manifest.json
(see megatron_conan/datagen/pydoc/ for the design, megatron_conan/datagen/README.md for the files
and their formats). Options after the flags are `key=value` fields of PydocCorpusConfig. The
directory appears complete or not at all; an existing one is refused unless --overwrite. Bad input ends in
one stderr line and exit status 2.
"""

import argparse
import sys
import time

from megatron_conan.config.loader import load_config
from megatron_conan.console import command_parser, run_command
from megatron_conan.datagen.pydoc.config import PydocCorpusConfig
from megatron_conan.datagen.pydoc.write import build_pydoc_corpus

PROG = "conan-build-pydoc-corpus"


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser(PROG, __doc__)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    parser.add_argument("--python", help="the interpreter whose documentation to use "
                                         "(default: this one)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="PydocCorpusConfig fields, e.g. seed=1 max_sft_examples=null")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return run_command(_main, argv, prog=PROG)


def _main(argv) -> int:
    args = parse_args(argv)
    config = load_config(PydocCorpusConfig, None, args.overrides)
    start = time.perf_counter()
    manifest = build_pydoc_corpus(args.output_dir, config, overwrite=args.overwrite,
                                  python=args.python)
    seconds = time.perf_counter() - start
    modules = manifest["modules"]
    print(f"Python {manifest['python']['version']} documentation: {modules['imported']} modules "  # user-facing
          f"imported, {modules['skipped']} skipped, {modules['private']} private; "
          f"{manifest['counts']['docstrings_kept']} docstrings, "
          f"{manifest['counts']['topic_sections']} topic sections; "
          f"{len(manifest['heldout_families'])} families held out")
    for name, info in manifest["files"].items():
        print(f"  {name:24s} {info['lines']:7,d} lines {info['bytes'] / 1e6:8.2f} MB")  # user-facing
    print(f"wrote {args.output_dir} in {seconds:.1f} s")  # user-facing
    return 0


if __name__ == "__main__":
    sys.exit(main())
