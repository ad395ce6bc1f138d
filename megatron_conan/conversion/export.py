"""The three conversions of ``conan-convert``:

- :func:`export_hf`: one of our checkpoints (any TP/PP) -> an HF ``LlamaForCausalLM`` directory;
- :func:`import_hf`: an HF Llama directory -> one of our checkpoints at a chosen TP/PP;
- :func:`export_sentence_transformer`: one of our embedding checkpoints -> a sentence-transformers
  directory (``LlamaModel`` + pooling + Normalize, prompts, Matryoshka dims recorded).

Everything the user can get wrong is checked before any weights are read; outputs are built in a
temporary directory renamed into place at the end (see ``README.md`` for the directory layouts).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

import torch

from megatron_conan.checkpoint.metadata import CheckpointInfo, read_checkpoint_info
from megatron_conan.checkpoint.standalone import read_full_state_dict, write_checkpoint_at_layout
from megatron_conan.config.model import POOLING_MODES, ConanModelConfig, ParallelConfig
from megatron_conan.conversion import hf_io, keymap
from megatron_conan.conversion.attention import (
    CheckpointAttention,
    check_attention_matches_config,
    checkpoint_attention,
    export_is_causal,
)
from megatron_conan.conversion.hf_config import (
    BASE_MODEL,
    CAUSAL_LM,
    dtype_of,
    hf_config_dict,
    hf_is_causal,
    model_config_from_hf,
    read_hf_config,
    write_hf_config,
)
from megatron_conan.conversion.tokenizer_export import export_tokenizer, write_tokenizer_config
from megatron_conan.data.tokenizer import ConanTokenizer
from megatron_conan.errors import InputError
from megatron_conan.losses.matryoshka import DEFAULT_DIMS, matryoshka_dims as usable_dims
from megatron_conan.ops.soft_mask_attention.schedule import SoftMaskConfig
from megatron_conan.outputs import atomic_output_dir, check_output_dir
from megatron_conan.tasks import format_instruction

logger = logging.getLogger(__name__)

EXPORT_RECORD = "conan_export.json"
"""Written into every exported directory: where it came from and how it embeds. `--overwrite`
replaces only a directory that has it."""
IMPORT_RECORD = "conan_import.json"
"""Written into every checkpoints directory `from-hf` makes: the source and the layout. `--overwrite`
replaces only a directory that has it."""
PREFIX_OF = {CAUSAL_LM: "model.", BASE_MODEL: ""}
"""HF state-dict key prefix of each architecture."""
ST_POOLING = {"mean": "mean", "last": "lasttoken", "first": "cls"}
"""Our pooling modes -> sentence-transformers' Pooling modes."""
DEFAULT_QUERY_INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"
"""The `query` prompt's instruction when neither the run nor the command line gives one."""
DEFAULT_MAX_SEQ_LENGTH = 512
"""Tokens per text in an exported embedder (the model's context allows more; raise it with care)."""


def resolve_tokenizer(info: CheckpointInfo, tokenizer: Optional[str]) -> str:
    """The SentencePiece model to export with `info`'s weights; its vocabulary must fit the model."""
    path = tokenizer or info.tokenizer_path()
    if path is None:
        raise InputError(f"{info.path}: its run config names no tokenizer (data.tokenizer); pass --tokenizer")
    if not os.path.isfile(path):
        raise InputError(f"tokenizer model {path} does not exist")
    vocab = ConanTokenizer(path).vocab_size
    if vocab != info.model_config.vocab_size:
        raise InputError(f"tokenizer {path} has {vocab} pieces but the checkpoint's model has vocab_size "
                         f"{info.model_config.vocab_size}")
    return path


def _attention_of(info: CheckpointInfo) -> CheckpointAttention:
    return checkpoint_attention(info.soft_mask, info.path)


def _write_record(directory: str, record: Dict[str, Any], name: str = EXPORT_RECORD) -> None:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _source_record(info: CheckpointInfo, attention: CheckpointAttention) -> Dict[str, Any]:
    from dataclasses import asdict

    return {"source_checkpoint": os.path.abspath(info.path), "step": info.step,
            "attention": attention.describe(), "model_config": asdict(info.model_config)}


def _hf_weights(info: CheckpointInfo, architecture: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    full = read_full_state_dict(info)
    hf = keymap.megatron_to_hf(full, info.model_config, PREFIX_OF[architecture],
                               include_lm_head=architecture == CAUSAL_LM)
    return {key: tensor.to(dtype) for key, tensor in hf.items()}


def _write_hf_model(directory: str, info: CheckpointInfo, architecture: str, dtype: torch.dtype,
                    is_causal: bool) -> None:
    write_hf_config(hf_config_dict(info.model_config, architecture, dtype, is_causal), directory)
    hf_io.write_safetensors(_hf_weights(info, architecture, dtype), directory)


def export_hf(checkpoint: str, output: str, tokenizer: Optional[str] = None, dtype: str = "fp32",
              overwrite: bool = False) -> str:
    """Write `checkpoint` as an HF ``LlamaForCausalLM`` directory with its tokenizer; returns `output`.

    The exported attention is the checkpoint's: causal, or bidirectional (``is_causal: false``) for a
    finished embedding checkpoint; a soft mask in between is refused.
    """
    info = read_checkpoint_info(checkpoint)
    torch_dtype = dtype_of(dtype)
    tokenizer_path = resolve_tokenizer(info, tokenizer)
    attention = _attention_of(info)
    is_causal = export_is_causal(attention, info.path)
    with atomic_output_dir(output, overwrite, [checkpoint, info.path, tokenizer_path], EXPORT_RECORD) as tmp:
        _write_hf_model(tmp, info, CAUSAL_LM, torch_dtype, is_causal)
        export_tokenizer(tokenizer_path, tmp, model_max_length=info.model_config.max_sequence_length)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as handle:
            json.dump({"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}, handle, indent=2)
        _write_record(tmp, {**_source_record(info, attention), "format": "hf", "dtype": dtype})
    logger.info("exported %s (step %d, %s attention) to %s", info.path, info.step, attention.describe(), output)
    return output


# -- Hugging Face -> Megatron ----------------------------------------------------------------------

def _load_hf_full_state(directory: str, model_config: ConanModelConfig, prefix: str) -> Dict[str, torch.Tensor]:
    """Module-level so that spawned ranks can each call it (read, not shipped, weights)."""
    return keymap.hf_to_megatron(hf_io.read_safetensors(directory), model_config, prefix)


def _check_hf_shapes(directory: str, model_config: ConanModelConfig, prefix: str) -> None:
    """The whole key map on the safetensors headers: every key known, every shape right."""
    meta = {key: torch.empty(shape, device="meta")
            for key, shape in hf_io.read_safetensors_shapes(directory).items()}
    keymap.hf_to_megatron(meta, model_config, prefix)


def import_hf(hf_dir: str, output: str, tensor_parallel: int = 1, pipeline_parallel: int = 1,
              overwrite: bool = False) -> str:
    """Write the HF Llama model in `hf_dir` as a checkpoint directory (``latest`` + ``iter_0000000``)
    at the given TP/PP, ready for ``checkpoint.load_dir``; returns `output`."""
    values = read_hf_config(hf_dir)
    model_config = model_config_from_hf(values, hf_dir)
    architecture = values["architectures"][0]
    prefix = PREFIX_OF[architecture]
    parallel = ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
    parallel.validate_for_model(model_config)
    _check_hf_shapes(hf_dir, model_config, prefix)
    check_output_dir(output, [hf_dir], overwrite, IMPORT_RECORD)
    final = os.path.abspath(output)
    tokenizer_source = os.path.join(hf_dir, "tokenizer.model")
    tokenizer = None
    if os.path.isfile(tokenizer_source):
        if ConanTokenizer(tokenizer_source).vocab_size == model_config.vocab_size:
            tokenizer = os.path.join(final, "tokenizer.model")
        else:
            logger.warning("%s does not fit the model's vocabulary: not carried over", tokenizer_source)
    extra: Dict[str, Any] = {"imported_from": os.path.abspath(hf_dir), "tokenizer": tokenizer,
                             "soft_mask": None}
    if not hf_is_causal(values):
        extra["soft_mask"] = {"step": 0, "config": SoftMaskConfig.bidirectional().to_dict()}
    with atomic_output_dir(output, overwrite, [hf_dir], IMPORT_RECORD) as tmp:
        load_state = functools.partial(_load_hf_full_state, os.path.abspath(hf_dir), model_config, prefix)
        write_checkpoint_at_layout(load_state, model_config, tmp, parallel, extra)
        if tokenizer is not None:
            shutil.copyfile(tokenizer_source, os.path.join(tmp, "tokenizer.model"))
        _write_record(tmp, {"format": "megatron_conan.import", "source": os.path.abspath(hf_dir),
                            "tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel},
                      IMPORT_RECORD)
    logger.info("imported %s as a TP%d/PP%d checkpoint in %s", hf_dir, tensor_parallel, pipeline_parallel, output)
    return output


# -- Megatron -> sentence-transformers -------------------------------------------------------------

def embedding_options(info: CheckpointInfo, pooling: Optional[str], query_instruction: Optional[str],
                       matryoshka_dims: Optional[Sequence[int]], pool_prompt: Optional[bool] = None) -> Dict[str, Any]:
    settings = info.embedding_settings()
    pooling = pooling or settings.get("pooling") or "mean"
    if pooling not in POOLING_MODES:
        raise InputError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    instruction = query_instruction or settings.get("query_instruction")
    if instruction is None:
        instruction = DEFAULT_QUERY_INSTRUCTION
        logger.warning("no query instruction in the run config or on the command line: using %r", instruction)
    dims = list(matryoshka_dims or settings.get("matryoshka_dims") or DEFAULT_DIMS)
    try:
        dims = usable_dims(info.model_config.hidden_size, dims)
    except ValueError as error:
        raise InputError(f"matryoshka dims: {error}") from None
    pool_prompt = settings.get("pool_prompt", False) if pool_prompt is None else pool_prompt
    return {"pooling": pooling, "query_instruction": instruction, "matryoshka_dims": dims,
            "pool_prompt": bool(pool_prompt)}


def text_length(model_config: ConanModelConfig, requested: Optional[int],
                info: Optional[CheckpointInfo] = None) -> int:
    """Tokens per text, the one truncation of every inference path (conan-encode, conan-eval, the
    miner, the export): `requested`; else the run's training length for passages
    (`embedding.max_passage_length`); else :data:`DEFAULT_MAX_SEQ_LENGTH`; capped at the context."""
    context = model_config.max_sequence_length
    trained = (info.embedding_settings().get("max_passage_length") if info is not None else None)
    length = requested if requested is not None else min(trained or DEFAULT_MAX_SEQ_LENGTH, context)
    if not 2 <= length <= context:
        raise InputError(f"max sequence length must be in [2, {context}] (the model's context), got {length}")
    return length


def query_prompt(instruction: str) -> str:
    """The `query` prompt: the training instruction template around `instruction`."""
    return format_instruction(instruction)


def export_sentence_transformer(checkpoint: str, output: str, tokenizer: Optional[str] = None,
                                pooling: Optional[str] = None, query_instruction: Optional[str] = None,
                                matryoshka_dims: Optional[Sequence[int]] = None,
                                max_seq_length: Optional[int] = None, dtype: str = "fp32",
                                overwrite: bool = False, bidirectional_from_causal: bool = False) -> str:
    """Write an embedding checkpoint as a sentence-transformers directory; returns `output`.

    Options default to the run's ``embedding`` section (pooling, query_instruction,
    matryoshka_dims); `max_seq_length` to the run's passage length, else 512 tokens or the model's
    context if shorter. The checkpoint's attention must be exactly bidirectional or causal.
    `bidirectional_from_causal`: export a causal (pretrain / SFT) checkpoint with ``is_causal:
    false``, the abrupt switch an embedding run can start from in another trainer; that export does
    not embed as the checkpoint does (its record says so).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    info = read_checkpoint_info(checkpoint)
    torch_dtype = dtype_of(dtype)
    tokenizer_path = resolve_tokenizer(info, tokenizer)
    attention = _attention_of(info)
    is_causal = export_is_causal(attention, info.path)
    if bidirectional_from_causal:
        if not is_causal:
            raise InputError(f"{info.path}: bidirectional_from_causal needs a causal checkpoint; its attention is "
                             f"{attention.describe()}")
        is_causal = False
    options = embedding_options(info, pooling, query_instruction, matryoshka_dims)
    max_seq_length = text_length(info.model_config, max_seq_length, info)
    prompts = {"query": query_prompt(options["query_instruction"]), "document": ""}
    with atomic_output_dir(output, overwrite, [checkpoint, info.path, tokenizer_path], EXPORT_RECORD) as tmp:
        transformer_dir = os.path.join(tmp, "_transformer")
        os.makedirs(transformer_dir)
        _write_hf_model(transformer_dir, info, BASE_MODEL, torch_dtype, is_causal)
        export_tokenizer(tokenizer_path, transformer_dir, model_max_length=max_seq_length, append_eos=True)
        transformer = Transformer(transformer_dir, max_seq_length=max_seq_length)
        model = SentenceTransformer(
            modules=[transformer, Pooling(info.model_config.hidden_size, ST_POOLING[options["pooling"]],
                                          include_prompt=options["pool_prompt"]), Normalize()],
            prompts=prompts, default_prompt_name=None, similarity_fn_name="cosine", device="cpu")
        check_attention_matches_config(model, transformer_dir)
        model.save(tmp)
        # sentence-transformers re-saves the model and tokenizer in its own words: put back ours
        # (top-level rope_theta, tokenizer_class for older transformers, the EOS-appending tokenizer)
        for name in ("config.json", "tokenizer.json", "tokenizer.model"):
            shutil.copyfile(os.path.join(transformer_dir, name), os.path.join(tmp, name))
        write_tokenizer_config(tmp, max_seq_length)
        shutil.rmtree(transformer_dir)
        record = {**_source_record(info, attention), "format": "sentence-transformers", "dtype": dtype,
                  **({"attention": "bidirectional (converted from causal)"} if bidirectional_from_causal else {}),
                  **options, "prompts": prompts, "max_seq_length": max_seq_length}
        _write_record(tmp, record)
        _append_model_card(tmp, record)
    logger.info("exported %s (step %d, %s attention) as a sentence-transformers model to %s",
                info.path, info.step, attention.describe(), output)
    return output


def _append_model_card(directory: str, record: Dict[str, Any]) -> None:
    dims: List[int] = record["matryoshka_dims"]
    lines = [
        "", "## Conan export", "",
        f"- Source: `{record['source_checkpoint']}` (step {record['step']}), {record['attention']} attention.",
        f"- Pooling: {record['pooling']}, the prompt {'included' if record['pool_prompt'] else 'left out'} "
        "(it conditions the text through attention); embeddings are L2-normalised; every text ends with "
        "`</s>` as in training.",
        f"- Prompts: `query` = {json.dumps(record['prompts']['query'])}, `document` = none.",
        f"- Matryoshka dims: {', '.join(map(str, dims))}. Truncate with `truncate_dim=` and re-normalise.",
        "- Needs transformers >= 5.2 for bidirectional attention (`is_causal: false`); check with "
        "`megatron_conan.conversion.attention.check_attention_matches_config(model, path)`.", "",
    ]
    with open(os.path.join(directory, "README.md"), "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
