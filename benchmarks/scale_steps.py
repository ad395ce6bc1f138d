"""The steps of the scale benchmark (benchmarks/scale.py): each builds its inputs untimed (cached by
benchmarks/scale_data.py), then calls ``measure(body)``, which times ``body()`` under the memory
sampler, and returns its extra figures (``output_bytes`` at least).

Signature of every step: ``step(data_dir, size, measure) -> dict``.
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy

from benchmarks.scale_data import (
    TableEmbedder,
    TextSource,
    ensure_indexed,
    ensure_jsonl,
    ensure_store,
    ensure_tokenizer,
    unit_vectors,
)

SEQ_LENGTH = 512
SEARCH_DIM = 256
"""Embedding width of the search and mining steps (cost grows with it linearly: docs/SCALE.md)."""
QUICK = os.environ.get("SCALE_QUICK") == "1"
"""Set by ``scale.py --quick``: the fixed side of the search steps shrinks with the sizes."""
FIXED_QUERIES = 50 if QUICK else 1_000
FIXED_CORPUS = 1_000 if QUICK else 100_000


def _bytes(pattern: str) -> int:
    return sum(os.path.getsize(path) for path in glob.glob(pattern) if os.path.isfile(path))


def _fresh(path: str) -> str:
    """`path` emptied: it is the benchmark's own scratch output under its data dir."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def preprocess(data: str, size: int, measure) -> dict:
    from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, preprocess_jsonl

    tokenizer = ensure_tokenizer(data)
    source = ensure_jsonl(os.path.join(data, f"text_{size}.jsonl"), size, "text")
    out = os.path.join(_fresh(os.path.join(data, "scratch")), "preprocess")
    result = measure(lambda: preprocess_jsonl(PreprocessConfig(inputs=[source], output_prefix=out, workers=2,
                                                                tokenizer_model=tokenizer, progress=False)))
    written = _bytes(out + ".*")
    kept = os.path.join(data, f"text_{size}")
    if not os.path.exists(kept + ".idx"):  # the index steps read the same dataset: made once
        for suffix in (".bin", ".meta.json", ".idx"):
            os.replace(out + suffix, kept + suffix)
    return {"output_bytes": written, "tokens": result.tokens, "input_bytes": os.path.getsize(source)}


def _blend(data: str, size: int, cache_dir: str):
    from megatron_conan.config.data import BlendedDataConfig

    main, second = ensure_indexed(data, size), ensure_indexed(data, max(size // 10, 10))
    return BlendedDataConfig.from_dict({"sources": [{"name": "main", "prefix": main, "weight": 0.7},
                                                    {"name": "second", "prefix": second, "weight": 0.3}],
                                        "split": "100,0,0", "cache_dir": cache_dir, "seed": 1234})


def _build_index(data: str, size: int, cache_dir: str):
    from megatron_conan.data.indexed import read_index
    from megatron_conan.data.pretraining import build_pretrain_datasets
    from megatron_conan.data.tokenizer import ConanTokenizer

    config = _blend(data, size, cache_dir)
    tokens = sum(int(read_index(source.prefix).sequence_lengths.sum()) for source in config.sources)
    samples = max(tokens // SEQ_LENGTH, 1)  # one epoch of the blend
    tokenizer = ConanTokenizer(ensure_tokenizer(data))
    return lambda: (build_pretrain_datasets(config, tokenizer, SEQ_LENGTH, (samples, 0, 0)), samples)[1]


def pretrain_index_cold(data: str, size: int, measure) -> dict:
    cache = _fresh(os.path.join(data, "scratch", "index_cache"))
    build = _build_index(data, size, cache)
    samples = measure(build)
    return {"output_bytes": _bytes(os.path.join(cache, "**", "*")) + _bytes(os.path.join(cache, "*")),
            "samples": samples}


def pretrain_index_cached(data: str, size: int, measure) -> dict:
    cache = _fresh(os.path.join(data, "scratch", "index_cache"))
    build = _build_index(data, size, cache)
    build()  # cold, untimed: the caches this run reads
    return {"output_bytes": 0, "samples": measure(build)}


def sft(data: str, size: int, measure) -> dict:
    """Open the SFT dataset, split it, and build every fixed-length training sample in batches of 64."""
    from megatron_conan.data.lm_datasets import collate
    from megatron_conan.data.sft import build_sft_datasets
    from megatron_conan.data.tokenizer import ConanTokenizer

    prefix = ensure_indexed(data, size, "sft")
    tokenizer = ConanTokenizer(ensure_tokenizer(data))

    def body() -> int:
        train, _, _ = build_sft_datasets(prefix, tokenizer, SEQ_LENGTH, split="100,0,0")
        for start in range(0, len(train), 64):
            collate([train[index] for index in range(start, min(start + 64, len(train)))])
        return len(train)

    return {"output_bytes": 0, "samples": measure(body)}


def contrastive_tokenize(data: str, size: int, measure) -> dict:
    from megatron_conan.preprocess.contrastive_tokenize import tokenize_contrastive
    from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig

    tokenizer = ensure_tokenizer(data)
    source = ensure_jsonl(os.path.join(data, f"pairs_{size}.jsonl"), size, "pair")
    out = os.path.join(_fresh(os.path.join(data, "scratch")), "store")
    measure(lambda: tokenize_contrastive(PreprocessConfig(inputs=[source], output_prefix=out, workers=2,
                                                          tokenizer_model=tokenizer, progress=False)))
    return {"output_bytes": _bytes(out + ".*"), "input_bytes": os.path.getsize(source)}


def contrastive_open(data: str, size: int, measure) -> dict:
    """What every rank of a stage-3 run does first: open the store, plan its loader, draw a batch."""
    from megatron_conan.data.contrastive import ContrastiveLoader
    from megatron_conan.data.tokenizer import ConanTokenizer

    store = ensure_store(data, size)
    tokenizer = ConanTokenizer(ensure_tokenizer(data))

    def body():
        loader = ContrastiveLoader(store, tokenizer, 64, seed=0, max_query_length=64, max_passage_length=128,
                                   tasks=["pair"])
        return loader, next(iter(loader))  # kept alive until the sampler's last reading: what a rank holds

    _, batch = measure(body)
    return {"output_bytes": 0, "batch": batch.size}


def contrastive_access(data: str, size: int, measure) -> dict:
    from megatron_conan.data.contrastive import ContrastiveStore

    store = ContrastiveStore(ensure_store(data, size))
    ids = numpy.random.default_rng(0).integers(0, len(store), 2_000)
    measure(lambda: [store.example(int(example_id)) for example_id in ids])
    return {"output_bytes": 0, "reads": len(ids)}


def dhnm(data: str, size: int, measure) -> dict:
    """The state of `size` examples (pools of 32, K = 7), every one seen: build, save, load (one rank)."""
    from megatron_conan.data.dhnm import DHNMState

    folder = _fresh(os.path.join(data, "scratch", "dhnm"))
    pools = numpy.full(size, 32, dtype=numpy.int64)

    def body() -> int:
        state = DHNMState(pools, 7)
        state.seen[:] = True  # the end of an epoch: every example has state to save
        state.first_scores[:] = 0.5
        state.save(folder)
        DHNMState(pools, 7).load(folder)
        return sum(value.nbytes for value in (state.positions, state.first_scores, state.cursor, state.seen,
                                              state.exhausted, state._pool))

    state_bytes = measure(body)
    return {"output_bytes": _bytes(os.path.join(folder, "dhnm", "*")), "state_bytes_per_example": state_bytes / size}


def _mine(data: str, queries: int, corpus_size: int, search: str, measure) -> dict:
    from megatron_conan.datagen.mining import Example, MiningConfig, mine_hard_negatives

    corpus = [f"passage {index}" for index in range(corpus_size)]
    examples = [Example(index + 1, {"task": "pair"}, f"query {index}", corpus[index % corpus_size], "")
                for index in range(queries)]
    config = MiningConfig(num_negatives=7, pool_size=32, skip_top=5, search=search)
    work = _fresh(os.path.join(data, "scratch", "mining"))
    pools, report = measure(lambda: mine_hard_negatives(examples, corpus, TableEmbedder(SEARCH_DIM), config, work))
    return {"output_bytes": 0, "mean_pool_size": report["mean_pool_size"], "queries": queries,
            "corpus": corpus_size, "search": report.get("search", search)}


def mining_exact_corpus(data: str, size: int, measure) -> dict:
    return _mine(data, min(FIXED_QUERIES, size), size, "exact", measure)


def mining_exact_queries(data: str, size: int, measure) -> dict:
    return _mine(data, size, FIXED_CORPUS, "exact", measure)


def mining_ann_corpus(data: str, size: int, measure) -> dict:
    return _mine(data, min(FIXED_QUERIES, size), size, "ann", measure)


def mining_ann_queries(data: str, size: int, measure) -> dict:
    return _mine(data, size, FIXED_CORPUS, "ann", measure)


def encode(data: str, size: int, measure) -> dict:
    """Embed `size` generated passages with the evaluation embedder: SCALE_ENCODE_MODEL (one of our
    checkpoints or an export), by default the main job's final checkpoint (make quickstart)."""
    from megatron_conan.eval.embedders import load_embedder

    model = os.environ.get("SCALE_ENCODE_MODEL") or "runs/quickstart/embed-sup/checkpoints"
    if not os.path.exists(model):
        raise FileNotFoundError(f"the encode step embeds with {model}: run make quickstart first, or set "
                                "SCALE_ENCODE_MODEL to a checkpoint or an exported model")
    texts = TextSource(stream=4, median_words=20).documents(size)
    with load_embedder(model, max_length=128) as embedder:
        vectors = measure(lambda: embedder.encode(texts, prompt_name="none", batch_size=64))
    return {"output_bytes": int(vectors.nbytes), "model": model}


def search(data: str, size: int, measure) -> dict:
    from megatron_conan.eval.search import exact_top_k

    corpus = unit_vectors(size, SEARCH_DIM, stream=1)
    queries = unit_vectors(FIXED_QUERIES, SEARCH_DIM, stream=2)
    scores, _ = measure(lambda: exact_top_k(queries, corpus, 100))
    return {"output_bytes": 0, "queries": FIXED_QUERIES, "k": int(scores.shape[1])}
