"""Writing the corpus: the rows of every output file, made from the split, and `build_pydoc_corpus`,
which runs collect, clean and split and writes them all with the manifest.

**Outputs** of `build_pydoc_corpus` (one directory, written to a temporary directory and renamed
at the end), formats in megatron_conan/datagen/README.md:

- ``pretrain.jsonl`` ``{"text"}``: every training docstring (headed by its signature or module
  name) and every pydoc topic in a seeded order; `iter_pretraining_texts` /
  `write_pretraining_jsonl` stream it, repeated to any size.
- ``sft.jsonl`` ``{"instruction", "input", "output"}``: "Explain what this function does." +
  signature -> its docstring (also classes, methods, attributes); "Summarise this module in one
  sentence." + the module's docstring without its summary -> the summary; "Explain this part of
  the Python language reference." + topic and section title -> the section.
- ``pairs.jsonl`` (stage 3) ``{"task": "pair", "query", "positive", "instruction"?}``: signature
  -> docstring; "module: summary" -> the rest of the module's docstring; "topic: section title"
  -> section; and (``retrieval_shaped_pairs``) every training docstring's summary line -> its
  titled rest with the retrieval instruction, the held-out task's shape on training families.
- ``retrieval.jsonl`` (stage 4) ``{"task": "retrieval", "query", "positive", "instruction"}``:
  summary line -> the rest of the docstring (the held-out task, on training families), without
  negatives (``tools/mine_hard_negatives.py`` mines them), and ``corpus.jsonl`` ``{"_id",
  "text"}``: the documents mining searches (every retrieval positive, then other training
  docstrings and topic sections). A docstring document is written as the held-out split presents
  it to a retriever: its qualified name (the BEIR title), a space, its text.
- ``sts.jsonl`` ``{"task": "sts", "text1", "text2", "score"}``: a graded *structural*
  relatedness, not human-judged similarity. ``text1`` is an anchor docstring's summary line,
  ``text2`` the first paragraph of another (or the same) docstring's rest, and ``score`` the
  closest relation of the two docstrings: 4 the same object, 3 the same class (a class and its
  members), 2 the same module, 1 the same package family, 0 different families. It is
  defensible as an ordinal relevance grade: each level is a strictly closer documented relation
  than the next (the reference groups them that way), and CoSENT uses only the order of the
  scores. One pair per level that exists for the anchor, so no level dominates.
- ``classification.jsonl`` ``{"task": "classification", "text", "label", "negative_labels",
  "instruction"}``: a docstring -> the package family it belongs to, among the
  ``classification_labels`` largest training families (a true, structural label; balanced up to
  ``max_classification_per_label`` per label).
- ``heldout/corpus.jsonl`` ``{"_id", "title", "text"}``, ``heldout/queries.jsonl`` ``{"_id",
  "text"}`` (both splits' queries), ``heldout/qrels/validation.tsv`` and ``heldout/qrels/test.tsv``
  (``query-id\tcorpus-id\tscore``).
- ``manifest.json``: Python version, seed, configuration, module and record counts, the split,
  the instructions, and per file its lines, bytes and SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

from megatron_conan import atomic_write
from megatron_conan.datagen.pydoc.clean import _ABBREVIATIONS, _SENTENCE_END, Collection, DocEntry, collect
from megatron_conan.datagen.pydoc.config import PydocCorpusConfig
from megatron_conan.datagen.pydoc.split import Split, _rng, _sample, split_collection
from megatron_conan.outputs import check_output_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
"""The corpus's record (counts, checksums, configuration); ``--overwrite`` replaces only a directory with one."""

RETRIEVAL_INSTRUCTION = ("Given a one-line summary of a Python API, retrieve the documentation "
                         "that describes it")
CLASSIFICATION_INSTRUCTION = ("Classify the Python documentation by the standard-library "
                              "package it belongs to")
STS_LEVELS = {4: "same object", 3: "same class", 2: "same module", 1: "same package family",
              0: "different families"}


def _truncate(text: str, max_chars: int) -> str:
    """Cuts at the last paragraph (else line, else word) boundary before `max_chars`."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    for boundary in ("\n\n", "\n", " "):
        cut = head.rfind(boundary)
        if cut > max_chars // 2:
            return head[:cut].rstrip()
    return head


def _pretraining_text(entry: DocEntry) -> str:
    header = f"Module {entry.qualname}" if entry.kind == "module" else (entry.signature or entry.qualname)
    return f"{header}\n\n{entry.text}"


def _pretraining_documents(collection: Collection, split: Split) -> List[str]:
    return ([_pretraining_text(entry) for entry in split.training]
            + [collection.topics[key].strip() for key in sorted(collection.topics)])


def _pretraining_stream(documents: List[str], seed: int, repeat: bool) -> Iterator[str]:
    epoch = 0
    while True:
        yield from _sample(documents, None, f"pretrain-{epoch}", seed)
        epoch += 1
        if not repeat:
            return


def iter_pretraining_texts(config: Optional[PydocCorpusConfig] = None, repeat: bool = False,
                           python: Optional[str] = None) -> Iterator[str]:
    """The pretraining documents (training families' docstrings and every pydoc topic), in a
    seeded order; with `repeat`, endlessly, reshuffled with a new seed each pass."""
    config = config or PydocCorpusConfig()
    collection = collect(config, python)
    documents = _pretraining_documents(collection, split_collection(collection, config))
    return _pretraining_stream(documents, config.seed, repeat)


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"


def _write_pretraining(path: str, documents: List[str], seed: int,
                       target_bytes: Optional[int]) -> Tuple[int, int]:
    written_docs = written_bytes = 0
    with open(path, "w", encoding="utf-8") as stream:
        for text in _pretraining_stream(documents, seed, repeat=target_bytes is not None):
            line = _json_line({"text": text})
            stream.write(line)
            written_docs += 1
            written_bytes += len(line.encode("utf-8"))
            if target_bytes is not None and written_bytes >= target_bytes:
                break
    return written_docs, written_bytes


def write_pretraining_jsonl(path: str, target_bytes: Optional[int] = None,
                            config: Optional[PydocCorpusConfig] = None,
                            python: Optional[str] = None) -> Tuple[int, int]:
    """Writes ``{"text"}`` lines: one pass over `iter_pretraining_texts`, or passes until
    `target_bytes` bytes (for example ~200 MB of real text for a preprocessing benchmark).
    Written atomically (`megatron_conan.atomic_write`). Returns (documents, bytes)."""
    config = config or PydocCorpusConfig()
    collection = collect(config, python)
    documents = _pretraining_documents(collection, split_collection(collection, config))
    with atomic_write.file(path) as tmp:
        result = _write_pretraining(tmp, documents, config.seed, target_bytes)
    return result


def _sft_rows(collection: Collection, split: Split, config: PydocCorpusConfig) -> List[dict]:
    instructions = {"function": "Explain what this function does.",
                    "method": "Explain what this method does.",
                    "class": "Explain what this class is for.",
                    "attribute": "Describe this attribute."}
    rows = []
    for entry in split.training:
        if entry.kind == "module":
            if entry.has_query:
                rows.append({"instruction": "Summarise this module in one sentence.",
                             "input": f"Module {entry.qualname}\n\n{_truncate(entry.body, config.max_passage_chars)}",
                             "output": entry.summary})
            continue
        rows.append({"instruction": instructions[entry.kind],
                     "input": entry.signature or entry.qualname,
                     "output": _truncate(entry.text, config.max_passage_chars)})
    for section in collection.sections:
        rows.append({"instruction": "Explain this part of the Python language reference.",
                     "input": section.title,
                     "output": _truncate(section.text, config.max_passage_chars)})
    return _sample(rows, config.max_sft_examples, "sft", config.seed)


def _pair_rows(collection: Collection, split: Split, config: PydocCorpusConfig) -> List[dict]:
    rows = []
    for entry in split.training:
        if entry.kind == "module":
            if entry.has_query:
                rows.append({"task": "pair", "query": f"{entry.qualname}: {entry.summary}",
                             "positive": _truncate(entry.body, config.max_passage_chars)})
        elif entry.signature:
            rows.append({"task": "pair", "query": entry.signature,
                         "positive": _truncate(entry.text, config.max_passage_chars)})
    for section in collection.sections:
        rows.append({"task": "pair", "query": section.title,
                     "positive": _truncate(section.text, config.max_passage_chars)})
    if config.retrieval_shaped_pairs:
        rows += [{"task": "pair", "query": entry.summary,
                  "positive": _titled(entry, _truncate(entry.body, config.max_passage_chars)),
                  "instruction": RETRIEVAL_INSTRUCTION}
                 for entry in split.training if entry.has_query]
    if config.inverse_cloze_pairs:
        rows += _inverse_cloze_rows(split, config)
    return _sample(rows, config.max_pair_examples, "pairs", config.seed)


def _sentences(text: str) -> List[str]:
    """The sentences of a docstring's prose paragraphs (whitespace normalised)."""
    found = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        flat = " ".join(paragraph.split())
        start = 0
        for match in _SENTENCE_END.finditer(flat):
            word = flat[:match.start() + 1].rsplit(" ", 1)[-1].lower()
            if word not in _ABBREVIATIONS:
                found.append(flat[start:match.end()].strip())
                start = match.end()
        found.append(flat[start:].strip())
    return [sentence for sentence in found if sentence]


def _inverse_cloze_rows(split: Split, config: PydocCorpusConfig) -> List[dict]:
    """Up to `config.inverse_cloze_pairs` per training docstring: a sentence after its first (the
    summary is the retrieval pair's query) of 30 to `max_summary_chars` characters that reads as
    prose, against the titled docstring with that sentence removed."""
    rows = []
    for entry in split.training:
        sentences = _sentences(entry.text)
        usable = [index for index, sentence in enumerate(sentences[1:], start=1)
                  if 30 <= len(sentence) <= config.max_summary_chars and sentence[0].isupper()
                  and sentence.rstrip()[-1:] in ".!?"]
        rng = _rng(f"inverse-cloze:{entry.qualname}", config.seed)
        for index in sorted(rng.sample(usable, min(config.inverse_cloze_pairs, len(usable)))):
            rest = " ".join(sentence for number, sentence in enumerate(sentences) if number != index)
            rows.append({"task": "pair", "query": sentences[index],
                         "positive": _titled(entry, _truncate(rest, config.max_passage_chars)),
                         "instruction": RETRIEVAL_INSTRUCTION})
    return rows


def _titled(entry: "DocEntry", text: str) -> str:
    """A document as the held-out split presents it: BEIR's title (the qualified name), a space, the
    text, which is how conan-eval and MTEB join a BEIR document's title and text."""
    return f"{entry.qualname} {text}"


def _retrieval_rows(split: Split, config: PydocCorpusConfig) -> List[dict]:
    entries = [entry for entry in split.training if entry.has_query]
    return [{"task": "retrieval", "query": entry.summary,
             "positive": _titled(entry, _truncate(entry.body, config.max_passage_chars)),
             "instruction": RETRIEVAL_INSTRUCTION}
            for entry in _sample(entries, config.max_retrieval_examples, "retrieval", config.seed)]


def _mining_corpus(collection: Collection, split: Split, retrieval: List[dict],
                   config: PydocCorpusConfig) -> List[dict]:
    texts, seen = [], set()
    for text in [row["positive"] for row in retrieval]:
        if text not in seen:
            seen.add(text)
            texts.append(text)
    others = [_titled(entry, _truncate(entry.body or entry.text, config.max_passage_chars))
              for entry in split.training]
    others += [_truncate(section.text, config.max_passage_chars) for section in collection.sections]
    for text in _sample(others, None, "mining-corpus", config.seed):
        if config.max_mining_corpus is not None and len(texts) >= config.max_mining_corpus:
            break
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return [{"_id": f"c{index}", "text": text} for index, text in enumerate(texts)]


def _first_paragraph(text: str, max_chars: int) -> str:
    return _truncate(" ".join(re.split(r"\n[ \t]*\n", text, maxsplit=1)[0].split()), max_chars)


def _class_of(entry: DocEntry) -> Optional[str]:
    """The class a docstring belongs to (a class's own, a member's), or None."""
    if entry.kind == "class":
        return entry.qualname
    return entry.parent if entry.kind in ("method", "attribute") else None


def sts_pairs(split: Split, config: PydocCorpusConfig) -> List[Tuple[DocEntry, DocEntry, int]]:
    """(anchor, partner, level) triples: for each sampled anchor, one random partner per level
    that has one (`STS_LEVELS`: 4 itself, 3 same class, 2 same module, 1 same family, 0 other)."""
    entries = [entry for entry in split.training if entry.has_query]
    by_class: Dict[str, List[DocEntry]] = {}
    by_module: Dict[str, List[DocEntry]] = {}
    by_family: Dict[str, List[DocEntry]] = {}
    for entry in entries:
        if _class_of(entry) is not None:
            by_class.setdefault(_class_of(entry), []).append(entry)
        by_module.setdefault(entry.module, []).append(entry)
        by_family.setdefault(entry.family, []).append(entry)
    rng = _rng("sts-partners", config.seed)

    def pick(pool: List[DocEntry], allowed) -> Optional[DocEntry]:
        choices = [other for other in pool if allowed(other)]
        return rng.choice(choices) if choices else None

    triples = []
    for anchor in _sample(entries, config.max_sts_anchors, "sts-anchors", config.seed):
        anchor_class = _class_of(anchor)
        partners = {
            4: anchor,
            3: pick(by_class.get(anchor_class, []), lambda other: other is not anchor),
            2: pick(by_module[anchor.module], lambda other: other is not anchor and (
                anchor_class is None or _class_of(other) != anchor_class)),
            1: pick(by_family[anchor.family], lambda other: other.module != anchor.module),
            0: pick(entries, lambda other: other.family != anchor.family),
        }
        triples.extend((anchor, partners[level], level) for level in sorted(partners, reverse=True)
                       if partners[level] is not None)
    return triples


def _sts_rows(split: Split, config: PydocCorpusConfig) -> List[dict]:
    return [{"task": "sts", "text1": anchor.summary, "text2": _first_paragraph(partner.body, 400),
             "score": float(level)} for anchor, partner, level in sts_pairs(split, config)]


def _classification_rows(split: Split, config: PydocCorpusConfig) -> List[dict]:
    if config.classification_labels == 0:
        return []
    sizes: Dict[str, int] = {}
    for entry in split.training:
        sizes[entry.family] = sizes.get(entry.family, 0) + 1
    labels = sorted(sorted(sizes, key=lambda family: (-sizes[family], family))[:config.classification_labels])
    rows = []
    for label in labels:
        members = [entry for entry in split.training if entry.family == label]
        for entry in _sample(members, config.max_classification_per_label, f"classification-{label}",
                             config.seed):
            rows.append({"task": "classification",
                         "text": _truncate(entry.text, config.max_passage_chars), "label": label,
                         "negative_labels": [other for other in labels if other != label],
                         "instruction": CLASSIFICATION_INSTRUCTION})
    return _sample(rows, None, "classification", config.seed)


def _heldout_files(split: Split, config: PydocCorpusConfig) -> Dict[str, List[str]]:
    corpus = [_json_line({"_id": entry.qualname, "title": entry.qualname,
                          "text": _truncate(entry.document, config.max_passage_chars)})
              for entry in sorted(split.documents, key=lambda entry: entry.qualname)]
    both = sorted(split.validation_queries + split.queries, key=lambda entry: entry.qualname)
    queries = [_json_line({"_id": f"q:{entry.qualname}", "text": entry.summary}) for entry in both]
    files = {"heldout/corpus.jsonl": corpus, "heldout/queries.jsonl": queries}
    for name, chosen in (("validation", split.validation_queries), ("test", split.queries)):
        files[f"heldout/qrels/{name}.tsv"] = ["query-id\tcorpus-id\tscore\n"] + [
            f"q:{entry.qualname}\t{entry.qualname}\t1\n" for entry in chosen]
    return files


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_lines(path: str, lines: List[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as stream:
        stream.writelines(lines)


def build_pydoc_corpus(output_dir: str, config: Optional[PydocCorpusConfig] = None,
                       overwrite: bool = False, python: Optional[str] = None) -> dict:
    """Writes every output into `output_dir` (see the module docstring) and returns the
    manifest. The directory is built beside its destination and renamed into place at the end;
    an existing `output_dir` is replaced only with `overwrite`, and only when it is a corpus this
    function wrote (it has ``manifest.json``; ``megatron_conan.outputs``)."""
    config = config or PydocCorpusConfig()
    output_dir = os.path.abspath(output_dir)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    check_output_dir(output_dir, overwrite=overwrite, record=MANIFEST)
    collection = collect(config, python)
    split = split_collection(collection, config)
    logger.info("%d docstrings and %d topic sections; %d families held out (%d documents, "
                "%d queries)", len(collection.entries), len(collection.sections),
                len(split.heldout_families), len(split.documents), len(split.queries))
    retrieval = _retrieval_rows(split, config)
    outputs = {
        "sft.jsonl": [_json_line(row) for row in _sft_rows(collection, split, config)],
        "pairs.jsonl": [_json_line(row) for row in _pair_rows(collection, split, config)],
        "retrieval.jsonl": [_json_line(row) for row in retrieval],
        "corpus.jsonl": [_json_line(row) for row in _mining_corpus(collection, split, retrieval, config)],
        "sts.jsonl": [_json_line(row) for row in _sts_rows(split, config)],
        "classification.jsonl": [_json_line(row) for row in _classification_rows(split, config)],
        **_heldout_files(split, config),
    }
    with atomic_write.directory(output_dir, overwrite) as staging:
        _write_pretraining(os.path.join(staging, "pretrain.jsonl"),
                           _pretraining_documents(collection, split), config.seed,
                           config.pretrain_target_bytes)
        for name, lines in outputs.items():
            _write_lines(os.path.join(staging, name), lines)
        files = {}
        for name in ["pretrain.jsonl"] + list(outputs):
            path = os.path.join(staging, name)
            with open(path, "rb") as stream:
                line_count = sum(1 for _ in stream)
            files[name] = {"lines": line_count - (1 if name.endswith(".tsv") else 0),
                           "bytes": os.path.getsize(path), "sha256": _sha256(path)}
        manifest = {
            "format": "megatron_conan.pydoc_corpus", "version": FORMAT_VERSION,
            "python": collection.python, "seed": config.seed,
            "config": dataclasses.asdict(config),
            "modules": {"imported": len(collection.modules_imported),
                        "skipped": len(collection.modules_skipped),
                        "private": collection.modules_private,
                        "imported_names": collection.modules_imported,
                        "skipped_reasons": collection.modules_skipped},
            "counts": {**collection.counts, **split.counts},
            "heldout_families": sorted(split.heldout_families),
            "heldout_splits": {name: sorted(family for family, chosen in split.split_of_family.items()
                                            if chosen == name) for name in ("validation", "test")},
            "instructions": {"retrieval": RETRIEVAL_INSTRUCTION,
                             "classification": CLASSIFICATION_INSTRUCTION, "sts": None},
            "sts_levels": {str(level): meaning for level, meaning in STS_LEVELS.items()},
            "files": files,
        }
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as stream:
            json.dump(manifest, stream, indent=2, ensure_ascii=False)
            stream.write("\n")
    return manifest
