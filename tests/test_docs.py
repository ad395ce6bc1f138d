"""The design lives in the repository: every reference to it points at docs/DESIGN.md, and every
"docs/DESIGN.md section N" that a file cites is a numbered section heading there."""

import functools
import os
import re
from typing import Dict, Iterator, List, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(REPO, "docs", "DESIGN.md")
THIS_FILE = os.path.abspath(__file__)

# what .gitignore ignores (build outputs, run directories, environments) is not the repository's
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "dist", "runs"}
MAX_BYTES = 2 << 20

# this file names the patterns, so the scan skips it
OUTSIDE = re.compile(r"\.\./shared|/work/shared|\bshared/[\w.-]*\.md|\bSTYLE\.md|\bGPU_CHECKS\.md|\bMEGATRON_ON_CPU\.md")
DESIGN_PATH = re.compile(r"[\w./-]*DESIGN\.md")
CITATION = re.compile(r"docs/DESIGN\.md,?\s+sections?\s+(\d+(?:\s*(?:-|,|and)\s*\d+)*)")
HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)


def _text_files() -> Iterator[Tuple[str, str]]:
    """(path relative to the repository, text) of every text file outside the skipped directories."""
    for directory, subdirs, files in os.walk(REPO):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = os.path.join(directory, name)
            if path == THIS_FILE or os.path.islink(path) or os.path.getsize(path) > MAX_BYTES:
                continue
            with open(path, "rb") as handle:
                data = handle.read()
            if b"\0" in data:
                continue  # binary (images, compiled objects)
            yield os.path.relpath(path, REPO), data.decode("utf-8", errors="replace")


def _cited_sections(numbers: str) -> Set[int]:
    """Section numbers of "3, 5, 6", "5-6" or "4 and 5"."""
    cited = set()
    for part in re.split(r"\s*(?:,|and)\s*", numbers.strip()):
        ends = [int(n) for n in part.split("-")]
        cited.update(range(ends[0], ends[-1] + 1))
    return cited


@functools.lru_cache(maxsize=None)
def _scan() -> Tuple[List[str], Dict[int, List[str]]]:
    """Lines pointing outside the repository, and the sections cited with where."""
    outside, citations = [], {}
    for relative, text in _text_files():
        for number, line in enumerate(text.splitlines(), 1):
            where = f"{relative}:{number}"
            if OUTSIDE.search(line):
                outside.append(f"{where}: {line.strip()}")
            for path in DESIGN_PATH.findall(line):
                if path != "docs/DESIGN.md":
                    outside.append(f"{where}: {path!r} is not docs/DESIGN.md: {line.strip()}")
            for match in CITATION.finditer(line):
                for section in _cited_sections(match.group(1)):
                    citations.setdefault(section, []).append(where)
    return outside, citations


def test_design_references_stay_in_the_repository():
    outside, citations = _scan()
    assert not outside, "references outside the repository:\n" + "\n".join(outside)
    assert citations, "nothing cites docs/DESIGN.md sections: the scan is broken"


def test_cited_sections_exist():
    with open(DESIGN, encoding="utf-8") as handle:
        headings = [int(n) for n in HEADING.findall(handle.read())]
    assert headings == list(range(1, len(headings) + 1)), f"sections are not numbered 1..n: {headings}"
    _, citations = _scan()
    missing = {section: where for section, where in citations.items() if section not in headings}
    assert not missing, f"cited sections missing from docs/DESIGN.md: {missing}"


def test_citation_parsing():
    assert _cited_sections("3, 5, 6") == {3, 5, 6}
    assert _cited_sections("5-6") == {5, 6}
    assert _cited_sections("4 and 5") == {4, 5}
    match = CITATION.search("(docs/DESIGN.md sections 3, 5, 6): 7 hard")
    assert match and _cited_sections(match.group(1)) == {3, 5, 6}
