"""Data formats and what training reads: tokenizer, indexed data, pretraining/SFT datasets, contrastive
store and loader, DHNM state.

Modules (formats in README.md beside this file): `tokenizer` (+ `word_cache`), `jsonl`, `indexed`,
`provenance`, `pretraining`, `sft`, `lm_datasets`, `contrastive`, `dhnm`. Offline preprocessing
(JSONL -> indexed data, the contrastive store) is in `megatron_conan.preprocess`, the generators of
training JSONL in `megatron_conan.datagen`. Nothing is imported here: preprocessing workers import
only the light modules they need.
"""
