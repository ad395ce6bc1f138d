"""ConanTokenizer (SentencePiece BPE) -> a Hugging Face ``tokenizers`` tokenizer giving the same ids.

SentencePiece's BPE encodes the whole (normalised) string: it starts from characters (user-defined
symbols matched first, whole) and repeatedly merges the adjacent pair whose concatenation is a piece
with the highest score, leftmost first; a piece left outside the vocabulary falls back to its UTF-8
bytes ``<0xXX>``. Our models use the identity normalisation, no dummy prefix and keep whitespace,
replacing each space with ``▁``. The equivalent ``tokenizers`` pipeline:

- normaliser: ``" " -> "▁"`` only (none when the model does not escape whitespace);
- no pre-tokeniser (SentencePiece does not split words when *encoding*);
- BPE over the same vocabulary with ``byte_fallback``; its merges are every split of a normal piece
  into two normal pieces, ranked by the merged piece's score (higher first), so the highest-scoring
  available merge fires first, as in SentencePiece;
- user-defined symbols (``<|reserved_i|>``) as added, non-special tokens: matched in text, as
  SentencePiece does; control symbols (``<pad> <unk> <s> </s>``) as special tokens that the text
  never produces (SentencePiece encodes the characters ``</s>`` in text as ordinary text):
  ``split_special_tokens`` in tokenizer_config.json.

Two flavours: the LLM tokenizer adds nothing (ids equal ``ConanTokenizer.encode``), the embedder's
appends ``</s>`` (EOD) to every text, as the embedding stages train (``ContrastiveLoader``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Tuple

from megatron_conan.data.tokenizer import BOS_PIECE, EOS_ID, EOS_PIECE, PAD_PIECE, UNK_PIECE
from megatron_conan.errors import InputError

# sentencepiece_model.proto ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_BPE = 2
_WHITESPACE = "\u2581"

HF_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""Written as tokenizer_class: every transformers version since 4.0 loads tokenizer.json with it."""


def _read_model_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as handle:
        try:
            proto.ParseFromString(handle.read())
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise InputError(f"{path} is not a SentencePiece model ({error})") from None
    if not proto.pieces:
        raise InputError(f"{path} is not a SentencePiece model (no pieces)")
    return proto


def _check_supported(proto, path: str) -> None:
    """Refuse SentencePiece settings the pipeline above does not reproduce."""
    normalizer = proto.normalizer_spec
    problems = []
    if proto.trainer_spec.model_type != _BPE:
        problems.append("not a BPE model")
    if normalizer.precompiled_charsmap:
        problems.append(f"normalisation {normalizer.name!r} (only identity)")
    if normalizer.add_dummy_prefix:
        problems.append("add_dummy_prefix")
    if normalizer.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    if not proto.trainer_spec.byte_fallback:
        problems.append("no byte_fallback")
    if problems:
        raise InputError(f"{path}: cannot export this SentencePiece model exactly ({'; '.join(problems)}); "
                         "the Conan tokenizer is BPE, identity-normalised, byte-fallback, no dummy prefix")


def bpe_merges(proto) -> List[Tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best merged score first."""
    normal = {piece.piece for piece in proto.pieces if piece.type == _NORMAL}
    ranked = []
    for index, piece in enumerate(proto.pieces):
        text = piece.piece
        if piece.type != _NORMAL or len(text) < 2:
            continue
        for cut in range(1, len(text)):
            if text[:cut] in normal and text[cut:] in normal:
                ranked.append((-piece.score, index, cut, text[:cut], text[cut:]))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_hf_tokenizer(model_path: str, append_eos: bool = False):
    """A ``tokenizers.Tokenizer`` with ConanTokenizer's ids (plus ``</s>`` at the end with `append_eos`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    proto = _read_model_proto(model_path)
    _check_supported(proto, model_path)
    vocab: Dict[str, int] = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    unk = next(piece.piece for piece in proto.pieces if piece.type == _UNKNOWN)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk, byte_fallback=True,
                              fuse_unk=False))
    if proto.normalizer_spec.escape_whitespaces:
        tokenizer.normalizer = normalizers.Replace(" ", _WHITESPACE)
        tokenizer.decoder = decoders.Sequence([decoders.Replace(_WHITESPACE, " "), decoders.ByteFallback(),
                                               decoders.Fuse()])
    else:
        tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(piece.piece, special=True, normalized=False)
                                  for piece in proto.pieces if piece.type in (_CONTROL, _UNKNOWN)])
    tokenizer.add_tokens([AddedToken(piece.piece, special=False, normalized=False)
                          for piece in proto.pieces if piece.type == _USER_DEFINED])
    if append_eos:
        eos = proto.pieces[EOS_ID].piece
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, EOS_ID)])
    return tokenizer


def tokenizer_config(model_max_length: int) -> Dict[str, object]:
    """tokenizer_config.json: the class, the special tokens, and no special-token matching in text."""
    return {
        "tokenizer_class": HF_TOKENIZER_CLASS,
        "bos_token": BOS_PIECE,
        "eos_token": EOS_PIECE,
        "unk_token": UNK_PIECE,
        "pad_token": PAD_PIECE,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        "padding_side": "right",
    }


def write_tokenizer_config(directory: str, model_max_length: int) -> None:
    """(Re)write tokenizer_config.json and special_tokens_map.json in `directory`."""
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config(model_max_length), handle, indent=2)
        handle.write("\n")
    special = {"bos_token": BOS_PIECE, "eos_token": EOS_PIECE, "unk_token": UNK_PIECE, "pad_token": PAD_PIECE}
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as handle:
        json.dump(special, handle, indent=2)
        handle.write("\n")


def export_tokenizer(model_path: str, directory: str, model_max_length: int, append_eos: bool = False) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the SentencePiece
    model itself (tokenizer.model, for `from-hf` and for SentencePiece users) into `directory`."""
    build_hf_tokenizer(model_path, append_eos=append_eos).save(os.path.join(directory, "tokenizer.json"))
    write_tokenizer_config(directory, model_max_length)
    shutil.copyfile(model_path, os.path.join(directory, "tokenizer.model"))
