"""Splitting the cleaned collection: whole module families held out for evaluation, the rest for
training, and the held-out retrieval set (validation and test queries over one corpus).

**Held-out split (``heldout/``, BEIR layout for ``conan-eval``).** Modules are grouped into
families (the top-level package; ``posix``, ``posixpath``, ``ntpath`` and ``genericpath`` join
``os``, ``sre_*`` joins ``re``). Whole families, in a seeded random order, are held out until
their docstrings that make a pair reach ``heldout_documents``; ``builtins`` never is (the pydoc
topics, which are training data, repeat its documentation). Nothing of a held-out family reaches
any training file (pretraining, SFT, pairs, retrieval, corpus, STS, classification). Task: the
query is a docstring's summary line (its first sentence, as a user would type a one-line
description of what they want), the relevant document is the same docstring *without* that
line (the rest of it), titled with the object's qualified name. The corpus holds every held-out
docstring of at least ``min_body_chars``: the rest for those that make a pair, the whole text for
the others, so the other documents of the same modules are the distractors. A query is dropped
when it is a verbatim substring of its own document (that only measures lexical overlap), when
another held-out docstring has the same summary or another document contains it (ambiguous),
or when a training docstring has it; a document is dropped when half or more of its word 8-grams
occur in the training text (near-duplicates across families). All these counts are in the
manifest. The held-out families are then dealt, in a seeded order, to a ``validation`` and a
``test`` split, each to the one with fewer query candidates so far: the two splits' queries come
from disjoint families and share the one corpus; each split samples up to ``max_heldout_queries``.
Every choice of the main job is made on validation; test is only reported. On CPython 3.11.7 with
the defaults: 1,122 documents, 300 validation and 300 test queries; BM25 (title + text) reaches
nDCG@10 0.449 on each, a random ranking 0.004 / 0.007.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Dict, List, Optional

from megatron_conan.datagen.pydoc.clean import Collection, DocEntry, _WORD, _first_sentence_end, _normalise
from megatron_conan.datagen.pydoc.config import PydocCorpusConfig

_NEVER_HELD_OUT = ("builtins",)
"""Families whose documentation the pydoc topics (always training data) repeat."""


def _rng(purpose: str, seed: int) -> random.Random:
    return random.Random(f"{purpose}:{seed}")


def _sample(items: list, limit: Optional[int], purpose: str, seed: int) -> list:
    """A seeded sample of at most `limit` items, in a seeded order."""
    items = list(items)
    _rng(purpose, seed).shuffle(items)
    return items if limit is None else items[:limit]


def _shingles(text: str) -> List[int]:
    words = _WORD.findall(text.lower())
    return [int.from_bytes(hashlib.blake2b(" ".join(words[i:i + 8]).encode(), digest_size=8).digest(),
                           "little") for i in range(max(0, len(words) - 7))]


@dataclasses.dataclass
class Split:
    """Families held out, the entries on each side and the held-out retrieval set."""

    heldout_families: List[str]
    training: List[DocEntry]
    heldout: List[DocEntry]
    documents: List[DocEntry]
    """Held-out corpus (text = `DocEntry.document`, title = the qualname)."""
    queries: List[DocEntry]
    """Held-out *test* queries (text = the summary); each one's relevant document is its own body.
    Only reported, never used for a choice."""
    counts: Dict[str, int]
    validation_queries: List[DocEntry] = dataclasses.field(default_factory=list)
    """Held-out *validation* queries, from other held-out families than the test queries: every
    choice (learning rates, steps, data mix) is made on these."""
    split_of_family: Dict[str, str] = dataclasses.field(default_factory=dict)
    """Held-out family -> ``validation`` or ``test``."""


def split_collection(collection: Collection, config: PydocCorpusConfig) -> Split:
    """Holds out whole families until their documents reach ``config.heldout_documents``."""
    heldout_families = _heldout_families(collection, config)
    held = set(heldout_families)
    training = [entry for entry in collection.entries if entry.family not in held]
    heldout = [entry for entry in collection.entries if entry.family in held]
    counts = {"heldout_documents_dropped_near_duplicate": 0, "heldout_queries_dropped_in_training": 0,
              "heldout_queries_dropped_ambiguous": 0, "heldout_queries_dropped_verbatim": 0}
    documents = _heldout_corpus(heldout, _training_shingles(training, collection), config.min_body_chars, counts)
    candidates = _query_candidates(documents, _training_summaries(training, collection), counts)
    split_of_family = _assign_heldout_families(heldout_families, candidates, config.seed)
    queries = {}
    for name in ("validation", "test"):
        pool = [entry for entry in candidates if split_of_family[entry.family] == name]
        queries[name] = sorted(_sample(pool, config.max_heldout_queries, f"heldout-queries-{name}", config.seed),
                               key=lambda entry: entry.qualname)
    counts.update(heldout_families=len(heldout_families), heldout_docstrings=len(heldout),
                  heldout_corpus=len(documents), heldout_queries=len(queries["test"]),
                  heldout_validation_queries=len(queries["validation"]),
                  heldout_query_candidates=len(candidates), training_docstrings=len(training))
    return Split(heldout_families, training, heldout, documents, queries["test"], counts,
                 validation_queries=queries["validation"], split_of_family=split_of_family)


def _heldout_families(collection: Collection, config: PydocCorpusConfig) -> List[str]:
    """Families in a seeded order, taken until their documents that can have a query reach
    ``config.heldout_documents`` (a family that would overshoot twice the target is passed over)."""
    documents_per_family: Dict[str, int] = {}
    for entry in collection.entries:
        if entry.has_query:  # the documents that can have a query
            documents_per_family[entry.family] = documents_per_family.get(entry.family, 0) + 1
    families = sorted(family for family in documents_per_family if family not in _NEVER_HELD_OUT)
    _rng("heldout-families", config.seed).shuffle(families)
    heldout_families, total = [], 0
    for family in families:
        if total >= config.heldout_documents:
            break
        if total + documents_per_family[family] > 2 * config.heldout_documents:
            continue  # one huge family would overshoot the target
        heldout_families.append(family)
        total += documents_per_family[family]
    return heldout_families


def _training_shingles(training: List[DocEntry], collection: Collection) -> set:
    """The word 8-grams of every training text (docstrings and pydoc topics)."""
    shingles = set()
    for text in [entry.text for entry in training] + list(collection.topics.values()):
        shingles.update(_shingles(text))
    return shingles


def _training_summaries(training: List[DocEntry], collection: Collection) -> set:
    """What a query must not be: any training text, nor the opening line or sentence of one."""
    summaries = set()
    for text in [entry.text for entry in training] + [section.text for section in collection.sections]:
        first = " ".join(re.split(r"\n[ \t]*\n", text, maxsplit=1)[0].split())
        cut = _first_sentence_end(first)
        summaries.update(_normalise(part) for part in (text, first, first[:cut] if cut > 0 else first))
    return summaries


def _heldout_corpus(heldout: List[DocEntry], training_shingles: set, min_body_chars: int,
                    counts: Dict[str, int]) -> List[DocEntry]:
    """The held-out documents of at least `min_body_chars`, less the near-duplicates of training text
    (half or more of their 8-grams in it), counted in `counts`."""
    documents = []
    for entry in heldout:
        if len(entry.document) < min_body_chars:
            continue
        shingles = _shingles(entry.document)
        if shingles and 2 * sum(s in training_shingles for s in shingles) >= len(shingles):
            counts["heldout_documents_dropped_near_duplicate"] += 1
            continue
        documents.append(entry)
    return documents


def _query_candidates(documents: List[DocEntry], training_summaries: set, counts: Dict[str, int]) -> List[DocEntry]:
    """The documents whose summary makes a fair query: not training text, not ambiguous, not verbatim
    in its own document; each drop counted in `counts`."""
    all_documents = "\x00".join(_normalise(entry.document) for entry in documents)
    summary_uses: Dict[str, int] = {}
    for entry in documents:
        if entry.has_query:
            key = _normalise(entry.summary)
            summary_uses[key] = summary_uses.get(key, 0) + 1
    candidates = []
    for entry in documents:
        if not entry.has_query:
            continue
        key = _normalise(entry.summary)
        if key in training_summaries:
            counts["heldout_queries_dropped_in_training"] += 1
        elif summary_uses[key] > 1 or key in all_documents:
            # Another document has this summary, or contains it word for word (its own rest
            # never does: that is the verbatim case below): the answer would be ambiguous.
            if key in _normalise(entry.body):
                counts["heldout_queries_dropped_verbatim"] += 1
            else:
                counts["heldout_queries_dropped_ambiguous"] += 1
        else:
            candidates.append(entry)
    return candidates


def _assign_heldout_families(families: List[str], candidates: List[DocEntry], seed: int) -> Dict[str, str]:
    """Each held-out family to ``validation`` or ``test`` (disjoint query families), in a seeded
    order, each to the split with fewer query candidates so far, so the two come out near equal."""
    per_family: Dict[str, int] = {}
    for entry in candidates:
        per_family[entry.family] = per_family.get(entry.family, 0) + 1
    order = sorted(families)
    _rng("heldout-validation-test", seed).shuffle(order)
    totals = {"validation": 0, "test": 0}
    assigned = {}
    for family in order:
        name = min(("test", "validation"), key=lambda split: totals[split])  # ties go to test
        assigned[family] = name
        totals[name] += per_family.get(family, 0)
    return assigned
