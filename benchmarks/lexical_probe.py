"""How much of the held-out task is word matching, and where a model keeps or loses it.

    python benchmarks/lexical_probe.py --work-dir runs/quickstart [--checkpoints random_init sft embed-weak]

Reads a finished main job (its held-out split, tokenizer and stage checkpoints) and scores on the
validation split (nDCG@10, pytrec_eval; the test split is not touched):

- **bags of tokens**, no model: a query and a document as the mean of one vector per token of our
  tokenizer, cut where the main job cuts texts. `one-hot` (cosine of token counts) and `random 128`
  (a fixed random Gaussian vector per token, the width of the main job's model; `--bag-widths`
  adds others), each plain and
  weighted by inverse document frequency over the held-out corpus. What a model that only kept
  each token's identity would score, and what weighting rare tokens adds.
- **each layer of each checkpoint**: the main job's own embedding (its prompt, truncation and mean
  pooling, the instruction left out of the mean) applied to the word embeddings and to the output
  of every decoder layer instead of the final norm's. Where the token identity that a bag of
  tokens scores on survives and where the network overwrites it.

docs/LEARNING.md section 5 uses this to say what limits the main job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Dict, List, Optional

import numpy

DEFAULT_CHECKPOINTS = ("random_init", "pretrain", "sft", "embed-weak", "embed-sup")


def unit_rows(vectors: numpy.ndarray) -> numpy.ndarray:
    return (vectors / numpy.maximum(numpy.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(numpy.float32)


def validation_ndcg(dataset, queries: numpy.ndarray, documents: numpy.ndarray) -> float:
    """nDCG@10 of the cosine of vectors that are not unit length (eval's embedders return unit
    vectors; these bags are not)."""
    from megatron_conan.eval.retrieval import DEFAULT_TOP_K, evaluate_run, run_from_top_k
    from megatron_conan.eval.search import exact_top_k

    scores, indices = exact_top_k(unit_rows(queries), unit_rows(documents), min(DEFAULT_TOP_K, len(dataset.doc_ids)))
    return evaluate_run(dataset, run_from_top_k(dataset, scores, indices))["ndcg_at_10"]


def bag_baselines(dataset, tokenizer_path: str, max_length: int, widths=(128,), seed: int = 0) -> Dict[str, float]:
    """nDCG@10 of mean token vectors (module docstring), random tables at each of `widths`; texts cut
    to `max_length` - 1 tokens."""
    from megatron_conan.data.tokenizer import ConanTokenizer

    tokenizer = ConanTokenizer(tokenizer_path)

    def cut(texts: List[str]) -> List[List[int]]:
        return [ids[:max_length - 1] for ids in tokenizer.encode_batch(list(texts))]

    query_ids, document_ids = cut(dataset.query_texts), cut(dataset.doc_texts)
    vocab = tokenizer.vocab_size
    frequency = numpy.zeros(vocab)
    for ids in document_ids:
        frequency[numpy.unique(ids)] += 1
    idf = numpy.log((len(document_ids) + 1) / (frequency + 0.5))
    tables = {"one-hot": numpy.eye(vocab, dtype=numpy.float32)}
    for width in widths:
        tables[f"random {width}"] = numpy.random.default_rng(seed).standard_normal((vocab, width)).astype(numpy.float32)

    def bag(rows: List[List[int]], table: numpy.ndarray, weights: Optional[numpy.ndarray]) -> numpy.ndarray:
        out = numpy.zeros((len(rows), table.shape[1]), dtype=numpy.float32)
        for row, ids in enumerate(rows):
            scale = numpy.ones(len(ids)) if weights is None else weights[ids]
            out[row] = (table[ids] * scale[:, None]).sum(0) / max(1, len(ids))
        return out

    return {f"{name}{suffix}": validation_ndcg(dataset, bag(query_ids, table, weights), bag(document_ids, table, weights))
            for name, table in tables.items() for suffix, weights in (("", None), (", idf-weighted", idf))}


@contextlib.contextmanager
def pooled_layer(model, layer: str):
    """The embedder's `hidden_states` returning `layer`'s output ("embedding", a decoder layer's
    index, or "final"): the embedder's batching, prompt and pooling unchanged around it."""
    import megatron_conan.models.embedder as embedder_module

    original = embedder_module.hidden_states
    if layer == "final":
        yield
        return
    module = model.embedding if layer == "embedding" else model.decoder.layers[int(layer)]
    captured = {}

    def keep(_module, _inputs, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    def hidden_states(wrapped, input_ids, lengths):
        final = original(wrapped, input_ids, lengths)
        return captured["hidden"][:final.shape[0]]  # [s, b, h] as the final states

    handle = module.register_forward_hook(keep)
    embedder_module.hidden_states = hidden_states
    try:
        yield
    finally:
        embedder_module.hidden_states = original
        handle.remove()


def probe_checkpoint(dataset, path: str, instruction: str, max_length: int) -> Dict[str, float]:
    from megatron_conan.eval.embedders import CheckpointEmbedder
    from megatron_conan.eval.retrieval import evaluate_embedder
    from megatron_conan.models.embedder import unwrap

    scores = {}
    with CheckpointEmbedder(path, query_instruction=instruction, max_length=max_length) as embedder:
        model = unwrap(embedder.model)
        for layer in ["embedding", *map(str, range(len(model.decoder.layers))), "final"]:
            with pooled_layer(model, layer):
                # each layer re-encodes the split: one pass per layer keeps the embedder's own
                # batching and pooling (a diagnostic, about a minute per checkpoint on 2 cores)
                scores[layer] = evaluate_embedder(embedder, dataset, batch_size=64)[0]["ndcg_at_10"]
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/quickstart")
    parser.add_argument("--checkpoints", nargs="*", default=list(DEFAULT_CHECKPOINTS),
                        help="stage directories of the work dir (those without checkpoints are left out; "
                             "none: the bags only)")
    parser.add_argument("--bag-widths", type=int, nargs="+", default=[128],
                        help="widths of the random token tables (128: the main job's model width)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text (the main job's passages)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    from megatron_conan.console import configure_logging, set_offline_switches
    from megatron_conan.eval.beir import load_beir
    from megatron_conan.jobs.workspace import stage_dir
    from megatron_conan.warning_filters import silence_known_warnings

    set_offline_switches()
    configure_logging()
    silence_known_warnings()
    heldout = os.path.join(args.work_dir, "corpus", "heldout")
    if not os.path.isdir(heldout):
        print(f"lexical_probe: {args.work_dir} is not a finished main job (no corpus/heldout)", file=sys.stderr)
        return 2
    dataset = load_beir(heldout, "validation")
    with open(os.path.join(args.work_dir, "corpus", "manifest.json"), encoding="utf-8") as handle:
        instruction = json.load(handle)["instructions"]["retrieval"]
    result = {"bags": bag_baselines(dataset, os.path.join(args.work_dir, "tokenizer", "pydoc.model"), args.max_length,
                                   args.bag_widths),
              "layers": {}}
    for name, value in result["bags"].items():
        print(f"bag of tokens, {name}: validation nDCG@10 {value:.3f}")
    for name in args.checkpoints:
        path = os.path.join(stage_dir(args.work_dir, name), "checkpoints")
        if os.path.isdir(path):
            result["layers"][name] = probe_checkpoint(dataset, path, instruction, args.max_length)
            print(f"{name}: " + "  ".join(f"{layer} {value:.3f}" for layer, value in result["layers"][name].items()))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
