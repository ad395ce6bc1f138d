"""Throughput of tools/preprocess_data.py (tokens/s) against a plain single-process loop.

    python benchmarks/preprocess_throughput.py --size-mb 200 --workers 1 2

Generates a multilingual JSONL corpus of --size-mb MB (megatron_conan.data.synthetic), trains a
tokenizer on a sample of it, then times in the same run: the plain loop (json.loads, encode one
document, megatron-core's IndexedDatasetBuilder.add_document), and the preprocessing library with
each worker count. Runs are interleaved and repeated (--repeats); the best wall time of each is
kept, with the CPU seconds it used (this process and its workers), since a shared machine's load
moves single timings. Checks that every run wrote the same tokens and prints the ratios.
"""

import argparse
import json
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python benchmarks/preprocess_throughput.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plain_loop(corpus: str, tokenizer_model: str, output_prefix: str) -> dict:
    """The baseline: one process, one document at a time."""
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    processor = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    eod = processor.eos_id()
    start = time.perf_counter()
    builder = IndexedDatasetBuilder(output_prefix + ".bin",
                                    dtype=DType.optimal_dtype(processor.get_piece_size()))
    documents = tokens = 0
    with open(corpus, "rb") as stream:
        for line in stream:
            ids = processor.encode(json.loads(line)["text"], out_type=int)
            ids.append(eod)
            builder.add_document(ids, [len(ids)])
            documents += 1
            tokens += len(ids)
    builder.finalize(output_prefix + ".idx")
    return {"documents": documents, "tokens": tokens, "seconds": time.perf_counter() - start}


def library_run(corpus: str, tokenizer_model: str, output_prefix: str, workers: int) -> dict:
    from megatron_conan.data.preprocess import PreprocessConfig, preprocess_jsonl

    start = time.perf_counter()
    result = preprocess_jsonl(PreprocessConfig(
        inputs=[corpus], output_prefix=output_prefix, tokenizer_model=tokenizer_model,
        workers=workers, progress=False))
    if result.bad_lines.total:
        raise RuntimeError(f"unexpected bad lines:\n{result.bad_lines.format()}")
    return {"documents": result.documents, "tokens": result.tokens,
            "seconds": time.perf_counter() - start}


def cpu_seconds() -> float:
    import resource

    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function, *args) -> dict:
    cpu = cpu_seconds()
    run = function(*args)
    run["cpu_seconds"] = cpu_seconds() - cpu
    return run


def same_files(prefix_a: str, prefix_b: str) -> bool:
    import filecmp

    return all(filecmp.cmp(prefix_a + suffix, prefix_b + suffix, shallow=False)
               for suffix in (".bin", ".idx"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--tokenizer-sentences", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="keep the corpus and outputs here (default: a temp dir)")
    parser.add_argument("--json-out", help="write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_conan.data.synthetic import write_pretraining_jsonl
    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or scratch
        os.makedirs(workdir, exist_ok=True)
        corpus = os.path.join(workdir, "corpus.jsonl")
        start = time.perf_counter()
        num_docs = write_pretraining_jsonl(corpus, num_bytes=int(args.size_mb * 1e6))
        size_mb = os.path.getsize(corpus) / 1e6
        print(f"corpus: {num_docs:,} documents, {size_mb:.1f} MB "
              f"(generated in {time.perf_counter() - start:.1f} s)")
        start = time.perf_counter()
        model_prefix = os.path.join(workdir, "tokenizer")
        train_tokenizer([corpus], model_prefix, TokenizerTrainingConfig(
            vocab_size=args.vocab_size, max_sentences=args.tokenizer_sentences))
        print(f"tokenizer: {args.vocab_size} pieces (trained in {time.perf_counter() - start:.1f} s)")
        model = model_prefix + ".model"

        plain_prefix = os.path.join(workdir, "plain")
        candidates = {"plain loop": (plain_loop, corpus, model, plain_prefix)}
        for workers in args.workers:
            candidates[f"preprocess_data --workers {workers}"] = (
                library_run, corpus, model, os.path.join(workdir, f"w{workers}"), workers)
        runs: dict = {}
        for repeat in range(args.repeats):
            for name, (function, *call) in candidates.items():
                run = timed(function, *call)
                if function is library_run:
                    run["identical_to_plain"] = same_files(plain_prefix, call[2])
                print(f"  repeat {repeat}: {name}: {run['seconds']:.1f} s wall, "
                      f"{run['cpu_seconds']:.1f} s CPU, load {os.getloadavg()[0]:.1f}")
                if name not in runs or run["seconds"] < runs[name]["seconds"]:
                    runs[name] = run
        base = runs["plain loop"]["tokens"] / runs["plain loop"]["seconds"]
        print(f"\nbest of {args.repeats} on {os.cpu_count()} CPUs\n"
              f"{'run':<30}{'seconds':>9}{'CPU s':>8}{'tokens/s':>13}{'MB/s':>8}{'vs loop':>9}")
        for name, run in runs.items():
            run["tokens_per_s"] = run["tokens"] / run["seconds"]
            run["mb_per_s"] = size_mb / run["seconds"]
            run["ratio_to_plain"] = run["tokens_per_s"] / base
            check = "" if run.get("identical_to_plain", True) else "  OUTPUT DIFFERS"
            print(f"{name:<30}{run['seconds']:>9.1f}{run['cpu_seconds']:>8.1f}"
                  f"{run['tokens_per_s']:>13,.0f}"
                  f"{run['mb_per_s']:>8.2f}{run['ratio_to_plain']:>8.2f}x{check}")
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as stream:
                json.dump({"size_mb": size_mb, "documents": num_docs, "cpus": os.cpu_count(),
                           "vocab_size": args.vocab_size, "repeats": args.repeats,
                           "runs": runs}, stream, indent=2)
    return 0 if all(run.get("identical_to_plain", True) for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
