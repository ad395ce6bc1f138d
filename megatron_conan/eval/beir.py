"""BEIR-layout retrieval datasets (the layout MTEB's retrieval tasks use), read with located errors.

    <dir>/corpus.jsonl       {"_id": str, "title": str (optional), "text": str} per line
    <dir>/queries.jsonl      {"_id": str, "text": str} per line
    <dir>/qrels/<split>.tsv  header line, then query-id <TAB> corpus-id <TAB> score (int)

A document's text is its title and text joined by a space (the title dropped when empty), as MTEB
builds it. Only queries that have judgements in the split are evaluated. Malformed lines, missing
fields, duplicate ids and judgements naming unknown queries or documents are errors naming the file
and line: a silently shrunk test set would change the metrics.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Iterator, List, Tuple

from megatron_conan.data.jsonl import iter_file_lines
from megatron_conan.errors import DataError, InputError
from megatron_conan.eval.text_io import existing_file, iter_jsonl_records, text_line


@dataclasses.dataclass
class RetrievalDataset:
    """One split of a BEIR-layout directory."""

    name: str
    """The directory."""
    split: str
    """The qrels split read (``test``, ``dev``, ...)."""
    doc_ids: List[str]
    """Corpus ids, in file order."""
    doc_texts: List[str]
    """Title + text of each document."""
    query_ids: List[str]
    """Ids of the judged queries, in file order."""
    query_texts: List[str]
    """Their texts."""
    qrels: Dict[str, Dict[str, int]]
    """query id -> {document id: relevance}."""


def _json_lines(path: str) -> Iterator[Tuple[int, dict]]:
    return iter_jsonl_records(path, skip_blank=True, what="a BEIR directory's file")


def _field(record: dict, name: str, path: str, number: int, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{path}:{number}: field {name!r} missing")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "_id":
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}:{number}: field {name!r} is a {type(value).__name__}, not a string")
    return value


def _read_texts(path: str, with_title: bool) -> Dict[str, str]:
    texts: Dict[str, str] = {}
    for number, record in _json_lines(path):
        identifier = _field(record, "_id", path, number)
        text = _field(record, "text", path, number)
        if with_title:
            title = _field(record, "title", path, number, required=False)
            text = f"{title} {text}".strip() if title else text
        if identifier in texts:
            raise DataError(f"{path}:{number}: duplicate _id {identifier!r}")
        texts[identifier] = text
    return texts


def _add_judgement(qrels: Dict[str, Dict[str, int]], fields: List[str], path: str, number: int) -> None:
    if len(fields) != 3:
        raise DataError(f"{path}:{number}: expected 3 tab-separated fields, got {len(fields)}")
    try:
        score = int(fields[2])
    except ValueError:
        raise DataError(f"{path}:{number}: score {fields[2]!r} is not an integer") from None
    qrels.setdefault(fields[0], {})[fields[1]] = score


def read_qrels(path: str) -> Dict[str, Dict[str, int]]:
    """query id -> {document id: relevance} from a BEIR qrels TSV (a header line first)."""
    existing_file(path, "qrels of the requested split:")
    qrels: Dict[str, Dict[str, int]] = {}
    for number, raw in enumerate(iter_file_lines(path), start=1):
        if number == 1:
            continue  # the header (query-id, corpus-id, score)
        line = text_line(raw, path, number)
        if line.strip():
            fields = line.rstrip("\r\n").split("\t")
            _add_judgement(qrels, fields, path, number)
    if not qrels:
        raise DataError(f"{path}: no judgements")
    return qrels


def load_beir(directory: str, split: str = "test") -> RetrievalDataset:
    """Read `split` of the BEIR-layout `directory`; see the module docstring."""
    if not os.path.isdir(directory):
        raise InputError(f"dataset {directory} is not a directory")
    corpus = _read_texts(os.path.join(directory, "corpus.jsonl"), with_title=True)
    queries = _read_texts(os.path.join(directory, "queries.jsonl"), with_title=False)
    qrels_path = os.path.join(directory, "qrels", f"{split}.tsv")
    qrels = read_qrels(qrels_path)
    unknown_queries = sorted(set(qrels) - set(queries))
    unknown_docs = sorted({doc for judged in qrels.values() for doc in judged} - set(corpus))
    for kind, missing in (("query", unknown_queries), ("corpus", unknown_docs)):
        if missing:
            raise DataError(f"{qrels_path}: {len(missing)} judgement(s) name a {kind} id that is not in the "
                            f"dataset, e.g. {missing[0]!r}")
    judged = [identifier for identifier in queries if identifier in qrels]
    return RetrievalDataset(name=directory, split=split, doc_ids=list(corpus), doc_texts=list(corpus.values()),
                            query_ids=judged, query_texts=[queries[identifier] for identifier in judged],
                            qrels=qrels)
