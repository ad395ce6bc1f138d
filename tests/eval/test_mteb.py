"""The MTEB wrapper runs an offline local retrieval task through mteb.evaluate."""

import os

import numpy
import pytest

from megatron_conan.eval.beir import load_beir
from megatron_conan.eval.embedders import load_embedder
from megatron_conan.eval.retrieval import evaluate_embedder

BEIR_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "beir_tiny")


def test_mteb_evaluate_offline_equals_conan_eval(artifacts, tmp_path):
    import mteb

    from megatron_conan.eval.mteb_model import ConanMTEBEncoder, local_retrieval_task

    with load_embedder(artifacts["sentence_transformer"]) as embedder:
        model = ConanMTEBEncoder(embedder, dim=32)
        assert model.mteb_model_meta.embed_dim == 32 and model.mteb_model_meta.max_tokens == 256
        assert model.mteb_model_meta.n_parameters > 0
        task = local_retrieval_task(BEIR_TINY, name="BeirTinyLocal")
        result = mteb.evaluate(model, [task], cache=mteb.ResultCache(str(tmp_path / "mteb")), show_progress_bar=False)
        scores = result.task_results[0].scores["test"][0]
        ours, _ = evaluate_embedder(embedder, load_beir(BEIR_TINY), dim=32)
    for name in ("ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10"):
        assert scores[name] == pytest.approx(ours[name], abs=1e-4), name
    assert scores["main_score"] == scores["ndcg_at_10"]


def test_prompt_types_map_to_our_prompts(artifacts):
    from mteb.types import PromptType

    from megatron_conan.eval.mteb_model import ConanMTEBEncoder

    texts = ["what does the with statement do"]
    batches = [{"text": texts}]
    with load_embedder(artifacts["sentence_transformer"]) as embedder:
        model = ConanMTEBEncoder(embedder)
        query = model.encode(batches, task_metadata=None, hf_split="test", hf_subset="default",
                             prompt_type=PromptType.query)
        document = model.encode(batches, task_metadata=None, hf_split="test", hf_subset="default",
                                prompt_type=PromptType.document)
        assert numpy.allclose(query, embedder.encode(texts, prompt_name="query"), atol=1e-6)
        assert numpy.allclose(document, embedder.encode(texts, prompt_name="none"), atol=1e-6)
        assert not numpy.allclose(query, document, atol=1e-3)
