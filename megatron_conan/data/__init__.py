"""Data for every stage: tokenizer, pretraining/SFT indexed data, contrastive store and loader.

Modules (formats in README.md beside this file): `tokenizer`, `preprocess` (+ `jsonl`, `parallel_encode`,
`encoders`, `indexed`), `pretraining`, `sft`, `contrastive`, `synthetic`. Nothing is imported here:
preprocessing workers import only the light modules they need.
"""
