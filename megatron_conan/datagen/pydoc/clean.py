"""Cleaning what the child interpreter collected: docstrings into `DocEntry`s (summary line and
rest split off, module family assigned), pydoc topics into `TopicSection`s; `collect(config)` runs
the child and returns the cleaned `Collection`.

**Text hygiene.** Docstrings are dedented (``inspect.cleandoc``); a signature that a C function
writes on its first docstring line (``log(x, [base=math.e])``) is moved to the signature;
texts shorter than ``min_doc_chars`` are dropped, and exact duplicates (after whitespace
normalisation; inherited and re-declared docstrings repeat) are kept once, under the first
record in (module, name) order. (The child's signatures are already clean: `collect`.)
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_conan.datagen.pydoc.collect import _collected
from megatron_conan.datagen.pydoc.config import PydocCorpusConfig

_FAMILIES = {"posix": "os", "nt": "os", "posixpath": "os", "ntpath": "os", "genericpath": "os",
             "sre_compile": "re", "sre_constants": "re", "sre_parse": "re"}
"""Modules whose documentation repeats another module's: they share its held-out family."""

_SIGNATURE_LINE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)(\s*->\s*\S.*)?$")
_UNDERLINE = re.compile(r"^([=\-~^*\"'`+#])\1{2,}$")

_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?][)\"']?\s+(?=[A-Z(\"'`*])")
_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "cf.", "no.", "approx.", "resp.", "incl."}


@dataclasses.dataclass(frozen=True)
class DocEntry:
    """One cleaned docstring of the standard library."""

    module: str
    """The public module it is documented under (``email.message``)."""
    qualname: str
    """Module, class and attribute names (``email.message.Message.get_payload``)."""
    kind: str
    """``module``, ``class``, ``function``, ``method`` or ``attribute``."""
    signature: Optional[str]
    """``qualname(params)`` (classes: ``class qualname(params)``), or None."""
    text: str
    """The cleaned docstring."""
    summary: str
    """Its summary line (see `_split_summary`), '' when the docstring makes no pair."""
    body: str
    """The rest of it after the summary line, '' when the docstring makes no pair."""
    family: str
    """The held-out unit: the top-level package, or the module it repeats (see _FAMILIES)."""

    @property
    def has_query(self) -> bool:
        """Whether the summary and the rest make a (query, document) pair."""
        return bool(self.summary) and bool(self.body)

    @property
    def document(self) -> str:
        """Its retrieval document: the rest after the summary, else (a distractor) the text."""
        return self.body if self.has_query else self.text

    @property
    def parent(self) -> str:
        """The class a member belongs to, else the module."""
        return self.qualname.rsplit(".", 1)[0] if self.kind in ("method", "attribute") else self.module


@dataclasses.dataclass(frozen=True)
class TopicSection:
    """One section of a pydoc topic."""

    topic: str
    """The topic key (``assert``)."""
    title: str
    """The topic's title line, or ``title: section heading`` for later sections."""
    text: str
    """The section's text."""


@dataclasses.dataclass
class Collection:
    """What the child interpreter found, cleaned."""

    python: Dict[str, str]
    modules_imported: List[str]
    modules_skipped: Dict[str, str]
    modules_private: int
    entries: List[DocEntry]
    topics: Dict[str, str]
    sections: List[TopicSection]
    counts: Dict[str, int]


def _family(module: str) -> str:
    top = module.split(".")[0]
    return _FAMILIES.get(top, top)


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def _clean_doc(raw: str, signature: Optional[str]) -> Tuple[str, Optional[str]]:
    """Dedents; moves a leading ``name(args)`` line (C functions' own signature) out of the text."""
    lines = inspect.cleandoc(raw).split("\n")
    while lines and _SIGNATURE_LINE.match(lines[0].strip()):
        first = lines.pop(0).strip()
        signature = signature or first
        if lines and lines[0].strip() in ("", "--"):
            lines.pop(0)
    return "\n".join(lines).strip(), signature


def _first_sentence_end(paragraph: str) -> int:
    """Where the first sentence of a one-line paragraph ends, or -1 when it is one sentence."""
    for match in _SENTENCE_END.finditer(paragraph):
        word = paragraph[:match.start() + 1].rsplit(" ", 1)[-1].lower()
        if word not in _ABBREVIATIONS and match.end() < len(paragraph):
            return match.end()
    return -1


def _split_summary(text: str, max_summary_chars: int, min_body_chars: int) -> Tuple[str, str]:
    """(summary, rest): the first paragraph, or its first sentence when the paragraph has more
    (PEP 257's summary line is one sentence; many docstrings run on), and the rest of the text.
    ('', '') when the summary is too long or too short, or the rest too short, to make a pair."""
    parts = re.split(r"\n[ \t]*\n", text, maxsplit=1)
    first = " ".join(parts[0].split())
    rest = parts[1].strip() if len(parts) == 2 else ""
    cut = _first_sentence_end(first)
    if cut > 0:
        summary, rest = first[:cut].strip(), (first[cut:].strip() + "\n\n" + rest).strip()
    else:
        summary = first
    if (len(summary) > max_summary_chars or len(_WORD.findall(summary)) < 3
            or len(rest) < min_body_chars):
        return "", ""
    return summary, rest


def _entries_from_records(records: Sequence[dict], config: PydocCorpusConfig,
                          counts: Dict[str, int]) -> List[DocEntry]:
    entries, seen = [], set()
    for record in sorted(records, key=lambda r: (r["module"], r["qualname"])):
        counts["docstrings_collected"] += 1
        text, signature = _clean_doc(record["doc"], record["signature"])
        if " at 0x" in text:  # an object's repr leaked into a docstring: machine-dependent
            counts["docstrings_dropped_address"] += 1
            continue
        if len(text) < config.min_doc_chars:
            counts["docstrings_dropped_short"] += 1
            continue
        key = _normalise(text)
        if key in seen:
            counts["docstrings_dropped_duplicate"] += 1
            continue
        seen.add(key)
        if signature is not None and signature.startswith("("):
            signature = record["qualname"] + signature
        if signature is not None and record["kind"] == "class":
            signature = "class " + signature
        summary, body = _split_summary(text, config.max_summary_chars, config.min_body_chars)
        entries.append(DocEntry(record["module"], record["qualname"], record["kind"], signature,
                                text, summary, body, _family(record["module"])))
    counts["docstrings_kept"] = len(entries)
    for entry in entries:
        counts[f"kind_{entry.kind}"] = counts.get(f"kind_{entry.kind}", 0) + 1
    return entries


def _topic_sections(topics: Dict[str, str], min_chars: int) -> List[TopicSection]:
    """Cuts each topic at its underlined headings (reStructuredText rendered as text)."""
    sections = []
    for key in sorted(topics):
        lines = topics[key].strip("\n").split("\n")
        title = lines[0].strip()
        start = 2 if len(lines) > 1 and _UNDERLINE.match(lines[1].strip()) else 1
        heading, current = title, []
        index = start
        while index <= len(lines):
            line = lines[index] if index < len(lines) else None
            is_heading = (line is not None and index + 1 < len(lines) and line.strip()
                          and _UNDERLINE.match(lines[index + 1].strip())
                          and len(lines[index + 1].strip()) >= len(line.strip()))
            if line is None or is_heading:
                text = "\n".join(current).strip()
                if len(text) >= min_chars:
                    sections.append(TopicSection(key, heading, text))
                if line is None:
                    break
                heading, current = f"{title}: {line.strip()}", []
                index += 2
                continue
            current.append(line)
            index += 1
    return sections


def collect(config: Optional[PydocCorpusConfig] = None, python: Optional[str] = None) -> Collection:
    """Runs the isolated child interpreter (``python``, default this one; cached per process)
    and cleans what it found."""
    config = config or PydocCorpusConfig()
    data = _collected(python or sys.executable)
    counts = {"docstrings_collected": 0, "docstrings_dropped_short": 0,
              "docstrings_dropped_duplicate": 0, "docstrings_dropped_address": 0}
    entries = _entries_from_records(data["records"], config, counts)
    sections = _topic_sections(data["topics"], config.min_doc_chars)
    counts["topics"] = len(data["topics"])
    counts["topic_sections"] = len(sections)
    return Collection(data["python"], data["modules_imported"], data["modules_skipped"],
                      data["modules_private"], entries, data["topics"], sections, counts)
