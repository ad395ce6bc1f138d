"""Preprocessing throughput (tokens/s) of tools/preprocess_data.py against a plain loop,
SentencePiece's multi-threaded batch encode and, given a checkout, Megatron-LM's tool.

    python benchmarks/preprocess_throughput.py --size-mb 200 --workers 2 --rounds 5 \
        --megatron-lm /tmp/megatron-lm

Corpus: real text, Python's own documentation (`megatron_conan.datagen.pydoc`: standard
library docstrings and pydoc topics, about 1.6 MB on CPython 3.11) repeated, reshuffled each pass,
to --size-mb; `--once` takes each text once instead (no repetition: the word cache only gains from
repeats within real text), `--synthetic` uses the generated multilingual corpus. Tokenizer: our recipe
(`train_tokenizer`), --vocab-size pieces, trained on one pass of the text.

Candidates, each a whole process timed from outside (interpreter start and imports included):
- `loop`: one process, one document at a time (json.loads, SentencePiece encode, append), then
  the .bin/.idx written at once;
- `sentencepiece threads`: one process, 1,024-line batches encoded by SentencePiece's own
  threads (as many as cores), then written;
- `preprocess_data --workers W` with the word cache, and the same with `--no-word-cache`;
- `Megatron-LM --workers W` (`--megatron-lm DIR`: its tools/preprocess_data.py with
  GPTSentencePieceTokenizer and --append-eod, run from the checkout on this interpreter);
- and, in this process, the encoding alone of one pass of the text (no repetition: every word is
  new to the cache), with a fresh word cache and with plain SentencePiece: the floor of the
  cache's gain.
Rounds are interleaved (every round runs every candidate, in an order rotated each round) and the
ratios are printed per round and as medians (for the two tools also net of each one's start-up,
which dominates a small corpus), since a shared machine's load moves single timings;
the load average is printed with each run. Every output is compared byte for byte with the loop's.
Also measured: the start-up of a one-document run of each tool, and with --stress-mb the peak
resident memory of the tool's processes (on the corpus, and on never-repeating words with two
--cache-mb bounds and two input sizes).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- baselines (run in a child process by `--baseline`) ---------------------------------------

def _write(prefix: str, model: str, sequences) -> int:
    import numpy

    from megatron_conan.data.indexed import IndexedDatasetWriter, token_dtype_for_vocab
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=model).get_piece_size()
    lengths = numpy.array([len(ids) for ids in sequences], dtype=numpy.int32)
    tokens = numpy.fromiter((token for ids in sequences for token in ids),
                            dtype=token_dtype_for_vocab(vocab), count=int(lengths.sum()))
    with IndexedDatasetWriter(prefix, token_dtype_for_vocab(vocab)) as writer:
        writer.add_batch(tokens, lengths, numpy.ones(len(lengths), dtype=numpy.int32))
        writer.commit()
    return int(lengths.sum())


def run_baseline(name: str, corpus: str, model: str, prefix: str) -> None:
    """`loop`: one document at a time; `threads`: batches through SentencePiece's threads."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    eod = processor.eos_id()
    sequences = []
    with open(corpus, "rb") as stream:
        if name == "loop":
            for line in stream:
                ids = processor.encode(json.loads(line)["text"], out_type=int)
                ids.append(eod)
                sequences.append(ids)
        else:
            threads = len(os.sched_getaffinity(0))
            batch = []
            for line in stream:
                batch.append(json.loads(line)["text"])
                if len(batch) == 1024:
                    sequences.extend(processor.encode(batch, out_type=int, num_threads=threads))
                    batch = []
            sequences.extend(processor.encode(batch, out_type=int, num_threads=threads))
            for ids in sequences:
                ids.append(eod)
    _write(prefix, model, sequences)


# -- measuring ---------------------------------------------------------------------------------

def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_process(command, env=None) -> dict:
    cpu = _children_cpu()
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": _children_cpu() - cpu,
            "load": os.getloadavg()[0]}


def tokens_of(prefix: str) -> int:
    from megatron_conan.data.indexed import read_index

    return int(read_index(prefix).sequence_lengths.sum())


def same_files(prefix_a: str, prefix_b: str) -> bool:
    import filecmp

    return all(filecmp.cmp(prefix_a + suffix, prefix_b + suffix, shallow=False)
               for suffix in (".bin", ".idx"))


def candidates(args, corpus: str, one_pass: str, model: str, workdir: str) -> dict:
    """name -> (command, env, output prefix, reference candidate)."""
    python = sys.executable
    tool = os.path.join(REPO, "tools", "preprocess_data.py")
    me = os.path.abspath(__file__)
    out = {
        "loop": ([python, me, "--baseline", "loop", corpus, model, f"{workdir}/loop"], None,
                 f"{workdir}/loop", None),
        "sentencepiece threads": (
            [python, me, "--baseline", "threads", corpus, model, f"{workdir}/threads"], None,
            f"{workdir}/threads", "loop"),
    }
    # --overwrite: every round writes the same outputs in the benchmark's own work directory
    common = ["--tokenizer-model", model, "--workers", str(args.workers), "--no-progress", "--overwrite"]
    out[f"preprocess_data --workers {args.workers}"] = (
        [python, tool, "--input", corpus, "--output-prefix", f"{workdir}/tool", *common], None,
        f"{workdir}/tool", "loop")
    out[f"preprocess_data --workers {args.workers} --no-word-cache"] = (
        [python, tool, "--input", corpus, "--output-prefix", f"{workdir}/nocache",
         "--no-word-cache", *common], None, f"{workdir}/nocache", "loop")
    if args.megatron_lm:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [args.megatron_lm] + ([args.megatron_lm_pythonpath]
                                  if args.megatron_lm_pythonpath else [])))
        out[f"Megatron-LM --workers {args.workers}"] = (
            [python, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"), "--input",
             corpus, "--output-prefix", f"{workdir}/megatron", "--tokenizer-type",
             "GPTSentencePieceTokenizer", "--tokenizer-model", model, "--workers",
             str(args.workers), "--append-eod", "--log-interval", "100000000"], env,
            f"{workdir}/megatron_text_document", "loop")
    return out


def first_pass_encoding(model: str, one_pass: str, cache_first: bool) -> dict:
    """Encoding alone, in this process, of one pass of the text (every word new to the cache):
    seconds of a fresh word cache and of plain SentencePiece, one thread, 1,024-text batches
    (`cache_first`: in that order; rounds alternate it)."""
    from megatron_conan.data.word_cache import CachedEncoder

    with open(one_pass, "rb") as stream:
        texts = [json.loads(line)["text"] for line in stream]
    batches = [texts[start:start + 1024] for start in range(0, len(texts), 1024)]
    seconds = {}
    order = (("cache", True), ("plain", False))
    for name, use_cache in (order if cache_first else order[::-1]):
        encoder = CachedEncoder.from_file(model, use_cache=use_cache)
        start = time.perf_counter()
        for batch in batches:
            encoder.encode(batch)
        seconds[name] = time.perf_counter() - start
    return seconds


def startup(args, model: str, workdir: str) -> dict:
    """Median wall time of a one-document run of each tool."""
    document = os.path.join(workdir, "one_document.jsonl")
    with open(document, "w", encoding="utf-8") as stream:
        stream.write(json.dumps({"text": "One short document."}) + "\n")
    commands = {"preprocess_data": [sys.executable, os.path.join(REPO, "tools",
                                                                 "preprocess_data.py"),
                                    "--input", document, "--output-prefix",
                                    f"{workdir}/startup", "--tokenizer-model", model,
                                    "--workers", str(args.workers), "--no-progress", "--overwrite"]}
    env = None
    if args.megatron_lm:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [args.megatron_lm] + ([args.megatron_lm_pythonpath]
                                  if args.megatron_lm_pythonpath else [])))
        commands["Megatron-LM"] = [
            sys.executable, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"),
            "--input", document, "--output-prefix", f"{workdir}/startup_megatron",
            "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", model,
            "--workers", str(args.workers), "--append-eod"]
    times = {name: [] for name in commands}
    for _ in range(args.startup_runs):
        for name, command in commands.items():
            times[name].append(timed_process(command, env if name == "Megatron-LM" else None)[
                "seconds"])
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss(command) -> dict:
    """Runs `command`, polling the resident memory of it and its worker processes every 50 ms;
    returns the peak of the main process and of the largest worker, MiB."""
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched = psutil.Process(process.pid)
    main_peak = worker_peak = 0
    while process.poll() is None:
        try:
            main_peak = max(main_peak, watched.memory_info().rss)
            for child in watched.children(recursive=True):
                worker_peak = max(worker_peak, child.memory_info().rss)
        except psutil.Error:  # a process ended between the listing and the reading
            pass
        time.sleep(0.05)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
    return {"main_mib": main_peak / 2**20, "largest_worker_mib": worker_peak / 2**20}


def write_unique_words(path: str, size_mb: float, seed: int = 0) -> None:
    """Documents of random words that never repeat: the worst case for the word cache."""
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    written = 0
    with open(path, "w", encoding="utf-8") as stream:
        while written < size_mb * 1e6:
            text = " ".join("".join(rng.choices(letters, k=rng.randint(4, 12)))
                            for _ in range(200))
            line = json.dumps({"text": text}) + "\n"
            stream.write(line)
            written += len(line)


def memory(args, corpus: str, model: str, workdir: str) -> dict:
    """Peak resident memory of the tool on the corpus, and on never-repeating words with two
    cache bounds: the workers' peak follows --cache-mb, not the input size."""
    tool = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"),
            "--tokenizer-model", model, "--workers", str(args.workers), "--no-progress", "--overwrite"]
    unique = os.path.join(workdir, "unique_words.jsonl")
    write_unique_words(unique, args.stress_mb)
    figures = {"corpus, --cache-mb 256": peak_rss(
        tool + ["--input", corpus, "--output-prefix", f"{workdir}/rss"])}
    for cache_mb in (16, 64):
        for size_mb in (args.stress_mb / 4, args.stress_mb):
            part = os.path.join(workdir, f"unique_{size_mb:g}.jsonl")
            with open(unique, "rb") as source, open(part, "wb") as target:
                target.write(source.read(int(size_mb * 1e6)).rsplit(b"\n", 1)[0] + b"\n")
            figures[f"unique words {size_mb:g} MB, --cache-mb {cache_mb}"] = peak_rss(
                tool + ["--input", part, "--output-prefix", f"{workdir}/rss_unique",
                        "--cache-mb", str(cache_mb)])
    for name, peaks in figures.items():
        print(f"peak RSS, {name}: main {peaks['main_mib']:.0f} MiB, largest worker "  # user-facing
              f"{peaks['largest_worker_mib']:.0f} MiB")
    return figures


def make_corpus(args, workdir: str):
    """(corpus, one pass of its text or None, tokenizer model, documents)."""
    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer

    corpus = os.path.join(workdir, "corpus.jsonl")
    one_pass = None
    if args.synthetic:
        from megatron_conan.datagen.synthetic import write_pretraining_jsonl

        documents = write_pretraining_jsonl(corpus, num_bytes=int(args.size_mb * 1e6))
        training = corpus
    elif args.once:
        from megatron_conan.datagen.pydoc.write import write_pretraining_jsonl

        documents, _ = write_pretraining_jsonl(corpus)
        one_pass = training = corpus
    else:
        from megatron_conan.datagen.pydoc.write import write_pretraining_jsonl

        one_pass = os.path.join(workdir, "one_pass.jsonl")
        write_pretraining_jsonl(one_pass)
        documents, _ = write_pretraining_jsonl(corpus, target_bytes=int(args.size_mb * 1e6))
        training = one_pass
    model_prefix = os.path.join(workdir, "tokenizer")
    train_tokenizer([training], model_prefix, TokenizerTrainingConfig(
        vocab_size=args.vocab_size, max_sentences=args.tokenizer_sentences))
    return corpus, one_pass, model_prefix + ".model", documents


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--tokenizer-sentences", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--startup-runs", type=int, default=5)
    parser.add_argument("--synthetic", action="store_true",
                        help="the generated multilingual corpus instead of Python's docs")
    parser.add_argument("--once", action="store_true",
                        help="each documentation text once (no repetition; --size-mb is ignored)")
    parser.add_argument("--megatron-lm", metavar="DIR",
                        help="a Megatron-LM checkout whose tools/preprocess_data.py to compare")
    parser.add_argument("--megatron-lm-pythonpath", metavar="DIR",
                        help="extra packages its tool needs (for example six), on PYTHONPATH")
    parser.add_argument("--stress-mb", type=float, default=0.0,
                        help="also measure peak memory, on the corpus and on this many MB of "
                             "never-repeating words (and a quarter of it) with two cache bounds")
    parser.add_argument("--workdir", help="keep the corpus and outputs here (default: temporary)")
    parser.add_argument("--json-out", help="write the figures as JSON here")
    parser.add_argument("--baseline", nargs=4, metavar=("NAME", "CORPUS", "MODEL", "PREFIX"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.baseline:
        run_baseline(*args.baseline)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        workdir = os.path.abspath(args.workdir or scratch)
        os.makedirs(workdir, exist_ok=True)
        start = time.perf_counter()
        corpus, one_pass, model, documents = make_corpus(args, workdir)
        size_mb = os.path.getsize(corpus) / 1e6
        print(f"corpus: {documents:,} documents, {size_mb:.1f} MB; "  # user-facing
              f"tokenizer {args.vocab_size} pieces ({time.perf_counter() - start:.0f} s to make both)")
        runs = candidates(args, corpus, one_pass, model, workdir)
        names = list(runs)
        results = {name: [] for name in names}
        first_pass = []
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            if one_pass:
                first_pass.append(first_pass_encoding(model, one_pass, round_index % 2 == 0))
                seconds = first_pass[-1]
                print(f"  round {round_index}: one pass of the text, encoding only: "  # user-facing
                      f"cache {seconds['cache']:.2f} s, plain {seconds['plain']:.2f} s")
            for name in order:
                command, env, prefix, reference = runs[name]
                run = timed_process(command, env)
                run["tokens"] = tokens_of(prefix)
                if reference is not None:
                    run["identical"] = same_files(prefix, runs[reference][2])
                results[name].append(run)
                print(f"  round {round_index}: {name}: {run['seconds']:.1f} s wall, "  # user-facing
                      f"{run['cpu_seconds']:.1f} s CPU, load {run['load']:.1f}"
                      + ("" if run.get("identical", True) else "  OUTPUT DIFFERS"))
        startup_seconds = startup(args, model, workdir)
        for name, seconds in startup_seconds.items():
            print(f"one-document run of {name}: {seconds:.2f} s (median of "  # user-facing
                  f"{args.startup_runs})")
        report = summarize(args, results, names, first_pass, startup_seconds)
        report["startup_seconds"] = startup_seconds
        if args.stress_mb:
            report["peak_rss"] = memory(args, corpus, model, workdir)
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as stream:
                json.dump({"size_mb": size_mb, "documents": documents, "cpus": os.cpu_count(),
                           "vocab_size": args.vocab_size, "rounds": args.rounds,
                           "workers": args.workers, "corpus": "synthetic" if args.synthetic
                           else "pydoc once" if args.once else "pydoc repeated", **report},
                          stream, indent=2)
    identical = all(run.get("identical", True) for runs_ in results.values() for run in runs_)
    return 0 if identical else 1


def summarize(args, results: dict, names, first_pass, startup_seconds: dict) -> dict:
    """Prints the per-round ratios against the tool and the median table; returns the figures."""
    tool = f"preprocess_data --workers {args.workers}"
    per_round = {name: [results[tool][index]["tokens"] / results[tool][index]["seconds"]
                        / (run["tokens"] / run["seconds"])
                        for index, run in enumerate(results[name])]
                 for name in names if name != tool}
    megatron = f"Megatron-LM --workers {args.workers}"
    if megatron in results:
        # the work itself: each round's wall time less the tool's own one-document run
        ours_net = [run["seconds"] - startup_seconds["preprocess_data"] for run in results[tool]]
        theirs_net = [run["seconds"] - startup_seconds["Megatron-LM"] for run in results[megatron]]
        per_round[f"{megatron}, net of start-up"] = [t / o for t, o in zip(theirs_net, ours_net)]
    if first_pass:
        per_round["first pass, encoding only: cache vs plain"] = [
            seconds["plain"] / seconds["cache"] for seconds in first_pass]
    print(f"\n{'run':<46}{'median s':>9}{'CPU s':>8}{'tokens/s':>13}")  # user-facing
    table = {}
    for name in names:
        seconds = statistics.median(run["seconds"] for run in results[name])
        cpu = statistics.median(run["cpu_seconds"] for run in results[name])
        tokens = results[name][0]["tokens"]
        table[name] = {"median_seconds": seconds, "median_cpu_seconds": cpu, "tokens": tokens,
                       "tokens_per_s": tokens / seconds,
                       "identical": all(run.get("identical", True) for run in results[name]),
                       "rounds": results[name]}
        print(f"{name:<46}{seconds:>9.1f}{cpu:>8.1f}{tokens / seconds:>13,.0f}")  # user-facing
    print("\nour tool's speed over each (per round; median):")  # user-facing
    for name, ratios in per_round.items():
        print(f"  {name:<44}" + " ".join(f"{ratio:.2f}x" for ratio in ratios)  # user-facing
              + f"   median {statistics.median(ratios):.2f}x")
    return {"runs": table, "ratios_per_round": per_round,
            "median_ratios": {name: statistics.median(r) for name, r in per_round.items()}}


if __name__ == "__main__":
    sys.exit(main())
