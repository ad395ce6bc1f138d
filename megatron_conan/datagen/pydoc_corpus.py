"""Real-text corpora for every stage, made only from Python's own documentation (no download).

Sources, and nothing else from the system (other files vary by machine and would make results
irreproducible):

- the docstrings of the standard library: modules, public classes, functions, methods,
  properties and C-level descriptors, each counted once under the public module that defines
  it (``obj.__module__``) or, for objects of private implementation modules such as ``_io``,
  under the first public module in name order that exports it;
- the ``pydoc`` topics (``pydoc_data.topics.topics``: the language reference pages that
  ``help("assert")`` shows), cut into sections at their underlined headings.

**Collection.** Importing the whole standard library has side effects (``antigravity`` opens a
browser, ``this`` prints, ``X.__main__`` runs a command line), and site-packages can replace
stdlib modules (setuptools' distutils hack). So this file runs itself as a script in a child
interpreter, ``python -I -S`` (no environment variables, no user or site packages, no script
directory on ``sys.path``), with stdin and stdout on /dev/null, imports every public module of
``sys.stdlib_module_names`` and their submodules in name order except the deny-list
(`DENIED_MODULES`, each with its reason), writes the docstrings and signatures as JSON and leaves
with ``os._exit`` (no atexit hook of an imported module runs). Every module is counted: imported,
denied, failed to import (with the exception), or private (leading underscore: implementation
modules whose objects are documented under the public module that exports them). This is why
the module imports only the standard library at top level.

**Determinism.** Every output is a function of the collected documentation and the seed alone:
modules, attributes and records are visited in sorted order, every random choice comes from a
``random.Random`` seeded with a string (``"<purpose>:<seed>"``, hashed with SHA-512, not with the
salted ``hash``), and sets are never iterated unsorted, so neither import order, PYTHONHASHSEED
nor dict order changes a byte (the tests build twice under different hash seeds). The corpus
depends on the Python version and build: these files were designed on CPython 3.11.7 (Linux),
whose documentation they contain; another Python version, or a build without an optional
extension module (``_ssl``, ``_sqlite3``, ``_curses`` ...), documents another set of objects and
gives another corpus. ``manifest.json`` records the version, the platform and the imported and
skipped modules, so two corpora can be compared.

**Text hygiene.** Docstrings are dedented (``inspect.cleandoc``); a signature that a C function
writes on its first docstring line (``log(x, [base=math.e])``) is moved to the signature;
texts shorter than ``min_doc_chars`` are dropped, and exact duplicates (after whitespace
normalisation; inherited and re-declared docstrings repeat) are kept once, under the first
record in (module, name) order. Signatures show a default only when it is a short literal
(``None``, a bool, a number, a short string without a path separator) and ``...`` otherwise,
so no memory address or installation path gets into the corpus.

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

**Outputs** of `build_pydoc_corpus` (one directory, written to a temporary directory and renamed
at the end), formats in README.md beside this file:

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
  (``query-id\\tcorpus-id\\tscore``).
- ``manifest.json``: Python version, seed, configuration, module and record counts, the split,
  the instructions, and per file its lines, bytes and SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import pkgutil
import random
import re
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Modules never imported, with why. Everything else public in sys.stdlib_module_names is tried.
DENIED_MODULES: Dict[str, str] = {
    "antigravity": "side effect: opens a web browser on import",
    "this": "side effect: prints the Zen of Python on import",
    "idlelib": "GUI: needs tkinter and a display",
    "tkinter": "GUI: needs Tk and a display, present only in some builds",
    "turtle": "GUI: imports tkinter and needs a display",
    "turtledemo": "GUI: turtle demos, need a display",
    "test, *.test, *.tests": "regression tests, not documentation; some of them act on import",
    "lib2to3": "may write grammar pickle caches into the installation on import",
    "pydoc_data": "read separately: the pydoc topics",
    "encodings.*": "hundreds of generated codec tables with one boilerplate docstring each",
    "*.__main__": "importing a package's __main__ runs its command line",
}

_FAMILIES = {"posix": "os", "nt": "os", "posixpath": "os", "ntpath": "os", "genericpath": "os",
             "sre_compile": "re", "sre_constants": "re", "sre_parse": "re"}
"""Modules whose documentation repeats another module's: they share its held-out family."""

_NEVER_HELD_OUT = ("builtins",)
"""Families whose documentation the pydoc topics (always training data) repeat."""

RETRIEVAL_INSTRUCTION = ("Given a one-line summary of a Python API, retrieve the documentation "
                         "that describes it")
CLASSIFICATION_INSTRUCTION = ("Classify the Python documentation by the standard-library "
                              "package it belongs to")
STS_LEVELS = {4: "same object", 3: "same class", 2: "same module", 1: "same package family",
              0: "different families"}

_SIGNATURE_LINE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)(\s*->\s*\S.*)?$")
_UNDERLINE = re.compile(r"^([=\-~^*\"'`+#])\1{2,}$")
_SAFE_STRING = re.compile(r"^[\w .,:;%+\-*#=!?<>{}()\[\]|&^~'\"]{0,24}$")
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?][)\"']?\s+(?=[A-Z(\"'`*])")
_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "cf.", "no.", "approx.", "resp.", "incl."}


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
        # Imported here: this file also runs as a script in an interpreter without site-packages.
        from megatron_conan.errors import ConfigError

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


# ---------------------------------------------------------------------------------------------
# Collection: this part runs in the isolated child interpreter (standard library only).

def _denied(name: str) -> Optional[str]:
    parts = name.split(".")
    if parts[-1] == "__main__":
        return DENIED_MODULES["*.__main__"]
    if any(part in ("test", "tests") for part in parts):
        return DENIED_MODULES["test, *.test, *.tests"]
    if parts[0] == "encodings" and len(parts) > 1:
        return DENIED_MODULES["encodings.*"]
    return DENIED_MODULES.get(parts[0])


def _safe_default(value) -> str:
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int) and abs(value) < 10 ** 12:
        return repr(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, (str, bytes)) and _SAFE_STRING.match(repr(value)):
        return repr(value)
    if isinstance(value, (tuple, frozenset, dict, list)) and not value:
        return repr(value)
    return "..."


class _Shown(str):
    """A default value that prints as the given text inside ``str(inspect.Signature)``."""

    def __repr__(self) -> str:
        return str(self)


def _signature(obj, drop_self: bool) -> Optional[str]:
    """The call signature without annotations and with only literal defaults, e.g.
    ``(obj, *, skipkeys=False, cls=None, **kw)``; None when Python cannot tell."""
    try:
        signature = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - inspect evaluates C text signatures; any failure: none
        return None
    parameters = list(signature.parameters.values())
    if drop_self and parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    shown = [parameter.replace(
        annotation=inspect.Parameter.empty,
        default=(parameter.default if parameter.default is inspect.Parameter.empty
                 else _Shown(_safe_default(parameter.default))))
        for parameter in parameters]
    try:
        return str(signature.replace(parameters=shown, return_annotation=inspect.Signature.empty))
    except ValueError:  # parameters out of order after dropping self: keep Python's own text
        return None


def _record(module: str, qualname: str, kind: str, doc, signature: Optional[str]) -> Optional[dict]:
    if not isinstance(doc, str) or not doc.strip():
        return None
    return {"module": module, "qualname": qualname, "kind": kind, "doc": doc,
            "signature": signature}


def _member_records(module: str, class_qualname: str, cls, claimed: set) -> List[dict]:
    records = []
    members = vars(cls)
    for name in sorted(members):
        if name.startswith("_"):
            continue
        raw = members[name]
        target = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        if id(target) in claimed:
            continue
        if isinstance(raw, property):
            kind, signature = "attribute", None
        elif inspect.isroutine(target):
            kind, signature = "method", _signature(target, drop_self=not isinstance(raw, staticmethod))
        elif inspect.isgetsetdescriptor(raw) or inspect.ismemberdescriptor(raw):
            kind, signature = "attribute", None
        else:
            continue
        claimed.add(id(target))
        record = _record(module, f"{class_qualname}.{name}", kind, getattr(raw, "__doc__", None),
                         signature)
        if record:
            records.append(record)
    return records


def _module_records(name: str, module, public_modules: set, claimed: set) -> List[dict]:
    """The module's own docstring, then its public classes (with members) and functions."""
    records = []
    module_record = _record(name, name, "module", getattr(module, "__doc__", None), None)
    if module_record:
        records.append(module_record)
    namespace = vars(module)
    for attribute in sorted(namespace):
        obj = namespace[attribute]
        if attribute.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        owner = getattr(obj, "__module__", None)
        # An object belongs to the public module that defines it; one of a private module
        # (`_io`, `_operator`) to the first public module in name order that exports it.
        if owner != name and owner in public_modules or id(obj) in claimed:
            continue
        claimed.add(id(obj))
        qualname = f"{name}.{attribute}"
        if inspect.isclass(obj):
            record = _record(name, qualname, "class", obj.__dict__.get("__doc__"),
                             _signature(obj, drop_self=False))
            if record:
                records.append(record)
            records.extend(_member_records(name, qualname, obj, claimed))
        else:
            record = _record(name, qualname, "function", obj.__doc__,
                             _signature(obj, drop_self=False))
            if record:
                records.append(record)
    return records


def _import_quietly(name: str, skipped: Dict[str, str]):
    try:
        return importlib.import_module(name)
    except BaseException as error:  # noqa: BLE001 - SystemExit and platform errors count too
        message = str(error).splitlines()[0] if str(error) else ""
        # Installation paths in messages would make the manifest machine-dependent.
        message = re.sub(r"\s*\([^)]*[/\\][^)]*\)", "", message)[:160]
        skipped[name] = f"import failed: {type(error).__name__}: {message}".rstrip(": ")
        return None


def _import_standard_library() -> Tuple[List[str], Dict[str, str], int]:
    """Imports every public stdlib module and submodule not denied, in name order. Returns the
    imported names, the skipped ones with their reason, and the number of private ones."""
    imported, skipped, private = [], {}, 0
    pending = sorted(name for name in sys.stdlib_module_names)
    while pending:
        name = pending.pop(0)
        if any(part.startswith("_") for part in name.split(".")):
            private += 1
            continue
        reason = _denied(name)
        if reason:
            skipped[name] = f"denied: {reason}"
            continue
        module = _import_quietly(name, skipped)
        if module is None:
            continue
        imported.append(name)
        if hasattr(module, "__path__"):
            children = sorted(f"{name}.{info.name}" for info in pkgutil.iter_modules(module.__path__))
            pending = children + pending
    return imported, skipped, private


def _collect_in_this_interpreter() -> dict:
    """The child's work: import, then read every docstring and the pydoc topics."""
    warnings.simplefilter("ignore")  # deprecation warnings of PEP 594 modules are expected
    imported, skipped, private = _import_standard_library()
    public = set(imported)
    claimed: set = set()
    records = []
    for name in sorted(imported):
        records.extend(_module_records(name, sys.modules[name], public, claimed))
    from pydoc_data.topics import topics

    return {
        "python": {"implementation": sys.implementation.name,
                   "version": ".".join(str(part) for part in sys.version_info[:3]),
                   "platform": sys.platform},
        "modules_imported": sorted(imported),
        "modules_skipped": dict(sorted(skipped.items())),
        "modules_private": private,
        "records": records,
        "topics": {key: topics[key] for key in sorted(topics)},
    }


def _child_main(output_path: str) -> None:
    data = _collect_in_this_interpreter()
    with open(output_path, "w", encoding="utf-8") as stream:
        json.dump(data, stream, ensure_ascii=False)
    # Skip interpreter shutdown: atexit hooks of the ~500 imported modules are not ours to run.
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# Parent side: clean, split and write.

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


def _run_child(python: str) -> dict:
    from megatron_conan.errors import DataError

    with tempfile.TemporaryDirectory(prefix="pydoc-collect-") as directory:
        output = os.path.join(directory, "collected.json")
        try:
            completed = subprocess.run(
                [python, "-I", "-S", os.path.abspath(__file__), "--collect-into", output],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                cwd=directory, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DataError(f"cannot collect Python's documentation with {python}: {error}") from error
        if completed.returncode != 0 or not os.path.exists(output):
            tail = completed.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"collecting Python's documentation with {python} failed "
                            f"(status {completed.returncode}): {tail[0]}")
        with open(output, encoding="utf-8") as stream:
            return json.load(stream)


@lru_cache(maxsize=4)
def _collected(python: str) -> dict:
    return _run_child(python)


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


def _rng(purpose: str, seed: int) -> random.Random:
    return random.Random(f"{purpose}:{seed}")


def _sample(items: list, limit: Optional[int], purpose: str, seed: int) -> list:
    """A seeded sample of at most `limit` items, in a seeded order."""
    items = list(items)
    _rng(purpose, seed).shuffle(items)
    return items if limit is None else items[:limit]


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
    held = set(heldout_families)
    training = [entry for entry in collection.entries if entry.family not in held]
    heldout = [entry for entry in collection.entries if entry.family in held]

    training_shingles = set()
    for text in [entry.text for entry in training] + list(collection.topics.values()):
        training_shingles.update(_shingles(text))
    # A query must not be any training text, nor the opening line or sentence of one.
    training_summaries = set()
    for text in [entry.text for entry in training] + [section.text for section in collection.sections]:
        first = " ".join(re.split(r"\n[ \t]*\n", text, maxsplit=1)[0].split())
        cut = _first_sentence_end(first)
        training_summaries.update(_normalise(part) for part in (text, first, first[:cut] if cut > 0 else first))
    counts = {"heldout_documents_dropped_near_duplicate": 0, "heldout_queries_dropped_in_training": 0,
              "heldout_queries_dropped_ambiguous": 0, "heldout_queries_dropped_verbatim": 0}
    documents = []
    for entry in heldout:
        if len(entry.document) < config.min_body_chars:
            continue
        shingles = _shingles(entry.document)
        if shingles and 2 * sum(s in training_shingles for s in shingles) >= len(shingles):
            counts["heldout_documents_dropped_near_duplicate"] += 1
            continue
        documents.append(entry)
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
    from megatron_conan import atomic_write  # not at the top: the collecting child runs this file isolated

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
    an existing `output_dir` is refused unless `overwrite`."""
    from megatron_conan import atomic_write  # not at the top: the collecting child runs this file isolated
    from megatron_conan.errors import DataError

    config = config or PydocCorpusConfig()
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise DataError(f"output directory exists: {output_dir} (pass --overwrite to replace it)")
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
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
        with open(os.path.join(staging, "manifest.json"), "w", encoding="utf-8") as stream:
            json.dump(manifest, stream, indent=2, ensure_ascii=False)
            stream.write("\n")
    return manifest


if __name__ == "__main__":  # the isolated child interpreter of `collect`
    if len(sys.argv) == 3 and sys.argv[1] == "--collect-into":
        _child_main(sys.argv[2])
    sys.exit(f"usage: python -I -S {os.path.basename(__file__)} --collect-into OUTPUT.json")
