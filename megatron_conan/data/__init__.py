"""Data formats and what training reads: tokenizer, indexed data, pretraining/SFT datasets, contrastive
store and loader, DHNM state.

Modules (formats in README.md beside this file): `tokenizer` (+ `word_cache`), `jsonl`, `indexed`,
`provenance`, `pretraining`, `sft`, `lm_datasets`, `contrastive`, `dhnm`, `synthetic`, `sft_pairs`,
`clr`, `pydoc_corpus`. Offline preprocessing (JSONL -> indexed data, the contrastive store) is in
`megatron_conan.preprocess`. Nothing is imported here: preprocessing workers import only the light
modules they need.
"""
