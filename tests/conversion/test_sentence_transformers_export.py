"""The sentence-transformers export embeds as our embedder does, and says how it was trained."""

import json
import os

import numpy
import pytest

from megatron_conan.conversion.attention import AttentionMismatchError, check_attention_matches_config
from megatron_conan.testing.fixtures import EMBEDDING_TEXTS

TEXTS = list(EMBEDDING_TEXTS)


@pytest.fixture(scope="module")
def exported(artifacts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(artifacts["sentence_transformer"], device="cpu", local_files_only=True)


def _cosines(first, second):
    first = first / numpy.linalg.norm(first, axis=1, keepdims=True)
    second = second / numpy.linalg.norm(second, axis=1, keepdims=True)
    return (first * second).sum(axis=1)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("prompt,dim", [("none", None), ("query", None), ("query", 16), ("none", 16)])
def test_embeddings_equal_our_embedder(artifacts, exported, padding_side, prompt, dim):
    exported.tokenizer.padding_side = padding_side
    try:
        vectors = exported.encode(TEXTS, prompt_name=None if prompt == "none" else prompt, batch_size=len(TEXTS),
                                  truncate_dim=dim)  # one ragged batch: every padding length at once
    finally:
        exported.tokenizer.padding_side = "right"
    ours = artifacts["embeddings"][(prompt, dim)]
    assert vectors.shape == ours.shape == (len(TEXTS), dim or 64)
    assert _cosines(vectors, ours).min() > 0.99999


def test_directory_records_prompts_pooling_and_matryoshka_dims(artifacts, exported):
    directory = artifacts["sentence_transformer"]
    query_prompt = "Instruct: Given a question, find the passage that answers it\nQuery: "
    assert exported.prompts["query"] == query_prompt == artifacts["prompts"]["query"]
    assert exported.prompts.get("document", "") == "" and exported.default_prompt_name is None
    assert exported.similarity_fn_name == "cosine" and exported.max_seq_length == 256
    with open(os.path.join(directory, "config.json")) as handle:
        config = json.load(handle)
    assert config["architectures"] == ["LlamaModel"] and config["is_causal"] is False
    with open(os.path.join(directory, "conan_export.json")) as handle:
        record = json.load(handle)
    assert record["matryoshka_dims"] == [16, 32, 64] and record["pooling"] == "mean"
    assert record["attention"] == "bidirectional"
    assert record["pool_prompt"] is False
    with open(os.path.join(directory, "1_Pooling", "config.json")) as handle:
        pooling = json.load(handle)
    assert pooling["pooling_mode"] == "mean" and pooling["include_prompt"] is False
    assert "Matryoshka dims: 16, 32, 64" in open(os.path.join(directory, "README.md")).read()
    assert not [name for name in os.listdir(os.path.dirname(directory)) if name.startswith(".")]  # no temp left


def test_an_old_transformers_that_runs_causal_is_detected(artifacts, exported):
    directory = artifacts["sentence_transformer"]
    check_attention_matches_config(exported, directory)  # transformers >= 5.2 honours is_causal
    exported[0].auto_model.config.is_causal = True  # what a version that ignores "is_causal": false runs
    try:
        with pytest.raises(AttentionMismatchError, match="asks for bidirectional .* does not attend that way"):
            check_attention_matches_config(exported, directory)
    finally:
        exported[0].auto_model.config.is_causal = False


def _prompt_pooling_body(rank, world_size, checkpoint):
    import torch

    from megatron_conan.eval.embedders import CheckpointEmbedder
    from megatron_conan.models.embedder import hidden_states

    with CheckpointEmbedder(checkpoint) as embedder:
        prompt = embedder.prompts["query"]
        skipped = len(embedder.tokenizer.encode(prompt))
        ids = embedder.tokenize([TEXTS[0]], prompt)[0]
        with torch.inference_mode():
            states = hidden_states(embedder.model, torch.tensor([ids]), torch.tensor([len(ids)]))[:, 0]  # [s, h]
        return {"skipped": skipped,
                "by_hand": torch.nn.functional.normalize(states[skipped:].mean(0).float(), dim=0).numpy(),
                "whole": torch.nn.functional.normalize(states.mean(0).float(), dim=0).numpy(),
                "ours": embedder.encode([TEXTS[0]], prompt_name="query")[0],
                "bare": embedder.encode([TEXTS[0]], prompt_name="none")[0]}


def test_the_query_prompt_conditions_the_text_but_is_left_out_of_the_mean(artifacts):
    """Our embedder's `query` vector is the mean over the text's own tokens of the hidden states of
    prompt + text: not the mean over every token, nor the text embedded without its prompt."""
    from megatron_conan.testing.distributed import run_distributed

    result = run_distributed(_prompt_pooling_body, 1, args=(artifacts["embed_checkpoint"],))[0]
    assert result["skipped"] > 5 and float(result["ours"] @ result["by_hand"]) > 0.99999
    assert float(result["ours"] @ result["whole"]) < 0.9999 and float(result["ours"] @ result["bare"]) < 0.9999
