"""The plans of the main job: how big every step is (the ``--plan`` choices of ``make quickstart``),
and ``field=value`` changes of a plan for a study (``--set``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List


@dataclasses.dataclass
class Plan:
    """How big every step is. `full` is the README's main job (about 8 minutes on 2 CPU cores);
    `quick` is the same pipeline in a minute or two (the test)."""

    corpus: Dict[str, Any]
    """PydocCorpusConfig fields."""
    vocab_size: int
    model: Dict[str, Any]
    """ConanModelConfig overrides of the `tiny` recipe (vocab_size follows the tokenizer)."""
    pretrain_steps: int
    sft_steps: int
    weak_steps: int
    sup_steps: int
    seq_length: int
    lm_batch: int
    weak_batch: int
    """Pairs per step over both DP ranks."""
    sup_batches: Dict[str, int]
    """Per-rank batch size per stage-4 task."""
    num_negatives: int
    num_candidates: int
    matryoshka_dims: List[int]
    max_query_length: int
    max_passage_length: int
    pretrain_lr: float = 3e-3
    """Peak learning rate of pretraining (cosine to a tenth of it)."""
    sft_lr: float = 3e-4
    """Peak learning rate of SFT (linear to a tenth of it)."""
    weak_lr: float = 1e-3
    sup_lr: float = 2e-4
    temperature: float = 0.05
    clip_grad: float = 10.0
    """Gradient-norm clip of the embedding stages. Their norms run 4-7 after the first steps, so a
    clip of 1 (the pretraining default) rescaled every step; a clip of 10 (only the first steps'
    norms of ~35 are cut) did better on validation (docs/LEARNING.md section 3)."""
    sup_task_weights: Dict[str, float] = dataclasses.field(
        default_factory=lambda: {"retrieval": 6.0, "classification": 1.0, "sts": 1.0})
    max_tokens_per_row: int = 128
    """The embedding stages train on packed rows of this many tokens (`embedding.packing`: texts back
    to back, attention within each text) instead of padding each text to its batch's longest; 0
    pads. As wide as the longest passage: on the CPU's SDPA a row costs width^2 attention whatever
    it holds. On this data a stage-3 step runs 1.68x faster packed (docs/PERFORMANCE.md)."""


PLANS = {
    "full": Plan(
        corpus={}, vocab_size=4096,
        # Word embeddings drawn wide (std 0.3) and untied from the output layer: the residual stream
        # starts as a bag of distinct token vectors, which the held-out task (mostly word matching)
        # rewards, and the language-model head keeps the usual small init (tied, the wide table
        # made the first logits so large that LM loss started at 37 and stayed above uniform).
        model={"hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 32,
               "ffn_hidden_size": 352, "num_layers": 4, "max_sequence_length": 256,
               "embedding_init_method_std": 0.3, "tie_embeddings": False},
        # chosen on the validation split (docs/LEARNING.md section 3): the language-model stages kept
        # short and gentle (at lr 3e-3 for 250 steps they overwrite the words and stage 3 cannot
        # bring them back), the time they free goes to contrastive steps, passages cut at 128 tokens
        pretrain_steps=100, pretrain_lr=3e-4, sft_steps=20, weak_steps=420, sup_steps=80, seq_length=256,
        lm_batch=16, weak_batch=64, sup_batches={"retrieval": 16, "classification": 16, "sts": 32}, num_negatives=3,
        num_candidates=8, matryoshka_dims=[16, 32, 64, 128], max_query_length=64, max_passage_length=128),
    "quick": Plan(
        corpus={"heldout_documents": 120, "max_heldout_queries": 40, "max_sft_examples": 200,
                "max_pair_examples": 200, "max_retrieval_examples": 120, "max_mining_corpus": 300,
                "max_sts_anchors": 40, "classification_labels": 4, "max_classification_per_label": 20},
        vocab_size=1000,
        model={"max_sequence_length": 128},
        pretrain_steps=4, sft_steps=2, weak_steps=3, sup_steps=4, seq_length=64, lm_batch=8,
        weak_batch=16, sup_batches={"retrieval": 4, "classification": 4, "sts": 8}, num_negatives=2,
        num_candidates=3, matryoshka_dims=[16, 32, 64], max_query_length=32, max_passage_length=64),
}


def plan_with(plan: Plan, settings: List[str]) -> Plan:
    """`plan` with ``field=value`` settings (value as JSON, else a string): a Plan field, or
    ``model.x`` / ``corpus.x`` merged into those dicts. ValueError names a malformed or unknown one."""
    changes: Dict[str, Any] = {}
    fields = {field.name for field in dataclasses.fields(Plan)}
    for setting in settings:
        key, equals, text = setting.partition("=")
        if not equals:
            raise ValueError(f"--set {setting!r}: expected field=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        section, dot, name = key.partition(".")
        if section not in fields or (dot and section not in ("model", "corpus")):
            raise ValueError(f"--set {setting!r}: {key} is not a plan field (fields: {', '.join(sorted(fields))}; "
                             "model.<ConanModelConfig field>, corpus.<PydocCorpusConfig field>)")
        if dot:
            changes[section] = {**changes.get(section, getattr(plan, section)), name: value}
        else:
            changes[key] = value
    return dataclasses.replace(plan, **changes)
