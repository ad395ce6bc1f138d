"""What the Python-documentation corpus build makes: `PydocCorpusConfig`, recorded in the manifest."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_conan.errors import ConfigError


@dataclasses.dataclass
class PydocCorpusConfig:
    """What `build_pydoc_corpus` builds; every field is recorded in the manifest."""

    seed: int = 0
    """Seeds the held-out family order and every sample and shuffle."""
    min_doc_chars: int = 40
    """Docstrings (after cleaning) and topic sections shorter than this are dropped."""
    min_body_chars: int = 80
    """A docstring's rest (after its summary line) must be this long to be a retrieval document."""
    max_summary_chars: int = 300
    """A first paragraph longer than this is not a summary line (no query is made from it)."""
    max_passage_chars: int = 2000
    """Passages (SFT outputs, positives, STS and classification texts) are cut at a paragraph
    boundary before this many characters; pretraining text is never cut."""
    heldout_documents: int = 750
    """Families are held out until their docstrings that can make a (query, document) pair
    reach this number; their other docstrings join the held-out corpus as distractors."""
    max_heldout_queries: int = 300
    """At most this many held-out queries per split, validation and test (a seeded sample)."""
    max_sft_examples: Optional[int] = 4000
    """At most this many SFT rows (a seeded sample); None keeps all."""
    max_pair_examples: Optional[int] = 10000
    """At most this many stage-3 pairs; None keeps all."""
    retrieval_shaped_pairs: bool = True
    """Stage-3 pairs also hold every training docstring's summary -> its titled rest, instructed as
    the retrieval task (summary-to-documentation, training families only), beside the weak pairs."""
    inverse_cloze_pairs: int = 2
    """Stage-3 pairs also hold up to this many inverse-cloze pairs per training docstring (Lee et
    al. 2019): one of its later sentences -> the titled docstring without that sentence, instructed
    as the retrieval task. More pairs of the task's shape than the summaries alone give."""
    max_retrieval_examples: Optional[int] = 3000
    """At most this many stage-4 retrieval queries; None keeps all."""
    max_mining_corpus: Optional[int] = 6000
    """At most this many documents in corpus.jsonl (all retrieval positives are always in)."""
    max_sts_anchors: Optional[int] = 600
    """At most this many STS anchors (up to five pairs each); None keeps all."""
    classification_labels: int = 8
    """Number of package families used as classification labels (the largest); 0 writes none."""
    max_classification_per_label: int = 150
    """At most this many classification texts per label."""
    pretrain_target_bytes: Optional[int] = None
    """Repeat pretrain.jsonl (reshuffled each pass) until it holds this many bytes; None: once."""

    def __post_init__(self):
        for name in ("min_doc_chars", "min_body_chars", "max_summary_chars", "max_passage_chars",
                     "heldout_documents", "max_heldout_queries", "max_classification_per_label"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_sft_examples", "max_pair_examples", "max_retrieval_examples",
                     "max_mining_corpus", "max_sts_anchors", "pretrain_target_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 or None, got {value}")
        if self.classification_labels == 1 or self.classification_labels < 0:
            raise ConfigError("classification_labels must be 0 (none) or at least 2, got "
                              f"{self.classification_labels}")
