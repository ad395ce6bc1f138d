"""Our embedder as an MTEB 2.x encoder, and MTEB retrieval tasks over local BEIR-layout directories.

    import mteb
    from megatron_conan.eval.embedders import load_embedder
    from megatron_conan.eval.mteb_model import ConanMTEBEncoder, local_retrieval_task

    with load_embedder("runs/embed_sup") as embedder:
        model = ConanMTEBEncoder(embedder, dim=512)
        results = mteb.evaluate(model, [local_retrieval_task("data/scifact", name="SciFactLocal")],
                                cache=mteb.ResultCache("results/mteb"))

The encoder maps MTEB's ``prompt_type`` to our prompts (query -> the instruction prompt, document
-> none, no prompt type -> none) and fills ``mteb_model_meta`` (parameter count, embedding dim,
context length, cosine similarity). :func:`local_retrieval_task` reads a BEIR directory with the same
reader as conan-eval, so MTEB needs no network for it (README.md beside this file).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy
from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.model_meta import ModelMeta
from mteb.similarity_functions import cos_sim, pairwise_cos_sim

from megatron_conan.eval.beir import load_beir
from megatron_conan.eval.embedders import CheckpointEmbedder, Embedder


def _prompt_name(prompt_type) -> str:
    value = getattr(prompt_type, "value", prompt_type)
    return {"query": "query", "document": "document"}.get(value, "none")


def _model_meta(embedder: Embedder, name: Optional[str], dim: int) -> ModelMeta:
    n_parameters = sum(parameter.numel() for parameter in embedder.model.parameters())
    max_tokens = embedder.max_length if isinstance(embedder, CheckpointEmbedder) else embedder.model.max_seq_length
    base = os.path.basename(os.path.normpath(embedder.name)) or "model"
    return ModelMeta(
        loader=None, name=name or f"megatron_conan/{base}", revision="local", release_date=None, languages=None,
        n_parameters=n_parameters, memory_usage_mb=None, max_tokens=max_tokens, embed_dim=dim,
        license=None, open_weights=True, public_training_code=None, public_training_data=None,
        framework=["PyTorch"], similarity_fn_name="cosine", use_instructions=True, training_datasets=None,
        reference=None, modalities=["text"], model_type=["dense"],
    )


class ConanMTEBEncoder:
    """``mteb``'s EncoderProtocol around an :class:`~megatron_conan.eval.embedders.Embedder`."""

    def __init__(self, embedder: Embedder, dim: Optional[int] = None, batch_size: int = 32,
                 model_name: Optional[str] = None, show_progress: bool = False):
        self.embedder = embedder
        self.dim = embedder.check_dim(dim) or embedder.dim
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.mteb_model_meta = _model_meta(embedder, model_name, self.dim)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs: Any) -> numpy.ndarray:
        """[n, dim] unit vectors of every text of the DataLoader `inputs`."""
        texts = [text for batch in inputs for text in batch["text"]]
        return self.embedder.encode(texts, prompt_name=_prompt_name(prompt_type), batch_size=self.batch_size,
                                    dim=self.dim, show_progress=self.show_progress)

    def similarity(self, embeddings1, embeddings2):
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        return pairwise_cos_sim(embeddings1, embeddings2)


class LocalBEIRRetrieval(AbsTaskRetrieval):
    """An MTEB retrieval task over a local BEIR-layout directory; make one with
    :func:`local_retrieval_task` (MTEB wants the metadata on the class, so each directory gets a
    subclass of its own)."""

    metadata: TaskMetadata
    directory: str

    def load_data(self, num_proc: Optional[int] = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = {"default": {}}
        for split in self.metadata.eval_splits:
            data = load_beir(self.directory, split)
            self.dataset["default"][split] = RetrievalSplitData(
                corpus=Dataset.from_dict({"id": data.doc_ids, "text": data.doc_texts}),
                queries=Dataset.from_dict({"id": data.query_ids, "text": data.query_texts}),
                relevant_docs=data.qrels, top_ranked=None)
        self.data_loaded = True


def local_retrieval_task(directory: str, name: Optional[str] = None, splits: Sequence[str] = ("test",),
                         languages: Sequence[str] = ("eng-Latn",), description: Optional[str] = None,
                         **kwargs: Any) -> LocalBEIRRetrieval:
    """An MTEB retrieval task over `directory` (BEIR layout): no network needed. Documents are
    title + text joined (our reader's form; MTEB joins them the same way)."""
    load_beir(directory, splits[0])  # a malformed directory fails here, with its file and line
    metadata = TaskMetadata(
        name=name or f"Local{os.path.basename(os.path.normpath(directory))}",
        description=description or f"Local BEIR-layout retrieval data in {directory}.", reference=None,
        dataset={"path": os.path.abspath(directory), "revision": "local"},
        type="Retrieval", category="t2t", modalities=["text"], eval_splits=list(splits),
        eval_langs=list(languages), main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None,
        license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None)
    task_class = type(metadata.name, (LocalBEIRRetrieval,), {"metadata": metadata, "directory": directory})
    return task_class(**kwargs)
