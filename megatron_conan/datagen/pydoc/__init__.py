"""Real-text corpora for every stage, made only from Python's own documentation (no download).

Sources, and nothing else from the system (other files vary by machine and would make results
irreproducible):

- the docstrings of the standard library: modules, public classes, functions, methods,
  properties and C-level descriptors, each counted once under the public module that defines
  it (``obj.__module__``) or, for objects of private implementation modules such as ``_io``,
  under the first public module in name order that exports it;
- the ``pydoc`` topics (``pydoc_data.topics.topics``: the language reference pages that
  ``help("assert")`` shows), cut into sections at their underlined headings.

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

The build, in the order it runs (each module's docstring has its part of the design):

- `config`: `PydocCorpusConfig`, what is built (every field is recorded in the manifest);
- `collect`: the isolated child interpreter that imports the standard library and dumps every
  docstring and the pydoc topics (standard library only: it runs as a script);
- `clean`: `collect(config)` runs the child and cleans what it found into a `Collection`;
- `split`: `split_collection` holds whole families out and builds the held-out retrieval set;
- `write`: the rows of every output file and `build_pydoc_corpus`, the public entry (also
  `iter_pretraining_texts` and `write_pretraining_jsonl`).

Nothing is imported here (the child runs `collect.py` as a script, outside the package).
"""
