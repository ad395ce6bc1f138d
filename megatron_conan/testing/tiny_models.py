"""Tiny models built offline for tests and demos: nothing is downloaded.

    from megatron_conan.testing.tiny_models import build_tiny_sentence_transformer

    path = build_tiny_sentence_transformer(tmp_path / "teacher")   # a few seconds on one core
    model = SentenceTransformer(path, device="cpu", local_files_only=True)

The sentence-transformers directory holds a tiny BERT (random weights from a fixed seed), a
WordPiece tokenizer trained with the `tokenizers` library on Python's own pydoc topics, mean
pooling and L2 normalisation: the layout `SentenceTransformer(path)` loads offline, the same as a
real embedding model's. Its embeddings mean nothing, but they are deterministic for the seed, so a
test can compute the expected scores with the model itself.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterator

TINY_VOCAB_SIZE = 600
"""WordPiece vocabulary of the tiny model (special tokens included)."""
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def pydoc_texts() -> Iterator[str]:
    """Paragraphs of Python's own documentation (the pydoc topics), in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if paragraph:
                yield paragraph


def _train_wordpiece(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tokenizer.train_from_iterator(pydoc_texts(), trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tokenizer


def build_tiny_tokenizer(max_length: int = 128):
    """A `BertTokenizerFast` with the tiny WordPiece vocabulary (lower-cased)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(tokenizer_object=_train_wordpiece(TINY_VOCAB_SIZE),
                             model_max_length=max_length, do_lower_case=True, unk_token="[UNK]",
                             pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                             mask_token="[MASK]")


def build_tiny_sentence_transformer(path, seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
                                    max_seq_length: int = 128) -> str:
    """Writes a tiny sentence-transformers model (BERT, mean pooling, Normalize) to `path` and
    returns the path as a string. Deterministic for `seed`; needs no network."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    path = os.fspath(path)
    base = os.path.join(path, "_base")
    tokenizer = build_tiny_tokenizer(max_seq_length)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                        num_hidden_layers=num_layers, num_attention_heads=2,
                        intermediate_size=2 * hidden_size, max_position_embeddings=max_seq_length,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    transformer = Transformer(base, max_seq_length=max_seq_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    model.save(path)
    shutil.rmtree(base)  # the model's files are now in `path` itself
    return path
