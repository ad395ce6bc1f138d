"""The preprocessing, conversion and check commands, one module per console script (setup.py):

| command | module | what |
|---|---|---|
| `conan-train-tokenizer` | `train_tokenizer.py` | SentencePiece tokenizer from JSONL or text |
| `conan-preprocess` | `preprocess.py` | JSONL -> indexed dataset (text, sft, contrastive), or merge |
| `conan-tokenize-contrastive` | `tokenize_contrastive.py` | contrastive JSONL -> tokenized contrastive store |
| `conan-sft-to-pairs` | `sft_to_pairs.py` | SFT JSONL -> stage-3 pairs, optionally teacher-filtered |
| `conan-build-clr` | `build_clr.py` | retrieval JSONL -> cross-lingual retrieval JSONL |
| `conan-build-pydoc-corpus` | `build_pydoc_corpus.py` | Python's documentation -> the demo corpora |
| `conan-mine` | `mine.py` | hard negatives for (query, positive) examples |
| `conan-convert` | `convert.py` | checkpoints <-> Hugging Face, sentence-transformers |
| `conan-gpu-check` | `gpu_check.py` | the prepared GPU check (a source checkout's benchmarks/) |

Each is a `main(argv=None)` under :func:`megatron_conan.console.run_command`; `python -m
megatron_conan.cli.<module>` runs the same command, and `tools/<name>.py` are thin scripts over them.
"""

from megatron_conan.warning_filters import silence_known_warnings

silence_known_warnings()  # before a command's module imports megatron-core: its import-time warnings are noise
