"""Tiny checkpoints and a tokenizer for the conversion and evaluation tests, built offline in seconds.

    tokenizer = train_tiny_tokenizer(directory)                       # 512 pieces = the tiny vocab
    made = make_tiny_checkpoints(directory, tokenizer)                # TP1, TP2, TP2xPP2 of one model
    embed_dir = copy_checkpoint_with_extra(made["paths"]["tp1"], directory / "embed",
                                           soft_mask=bidirectional_soft_mask_state(),
                                           run_config=embedding_run_config(tokenizer))

Every layout holds the *same* weights (a deterministic full state dict, loaded into each layout and
saved with the training checkpoint functions), so a test can compare any of them with one reference.
The weights are random but larger than an initialisation (norm gains around 1, matrices with std
0.08) so that outputs differ clearly between positions and texts.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from megatron_conan.config.model import ConanModelConfig, ParallelConfig, tiny

TINY_LAYOUTS: Dict[str, Tuple[int, int]] = {"tp1": (1, 1), "tp2": (2, 1), "tp2pp2": (2, 2)}
"""Checkpoint name -> (tensor parallel, pipeline parallel)."""
REFERENCE_BATCH = torch.tensor([[5, 17, 300, 42, 7, 99, 256, 3], [400, 2, 81, 81, 81, 9, 500, 11]])
"""Token ids [2, 8] whose logits :func:`make_tiny_checkpoints` returns as the reference."""


def train_tiny_tokenizer(directory: str, vocab_size: int = 512) -> str:
    """A SentencePiece model of the project's kind (BPE, byte fallback, identity normalisation)
    trained on the repository's synthetic multilingual text; returns the ``.model`` path."""
    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer
    from megatron_conan.datagen import synthetic

    os.makedirs(directory, exist_ok=True)
    corpus = os.path.join(directory, "tokenizer_corpus.jsonl")
    synthetic.write_pretraining_jsonl(corpus, num_docs=300, seed=3)
    prefix = os.path.join(directory, "tokenizer")
    train_tokenizer([corpus], prefix, TokenizerTrainingConfig(vocab_size=vocab_size, num_threads=1,
                                                               character_coverage=0.98))
    return prefix + ".model"


def tiny_full_state_dict(model_config: Optional[ConanModelConfig] = None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Deterministic full (TP1/PP1-named) weights for `model_config` (default the tiny recipe)."""
    from megatron_conan.conversion.keymap import megatron_shapes

    model_config = model_config or tiny()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sorted(megatron_shapes(model_config).items()):
        noise = torch.randn(shape, generator=generator)
        state[key] = 1.0 + 0.1 * noise if len(shape) == 1 else 0.08 * noise
    return state


def _reference_logits(model) -> torch.Tensor:
    with torch.no_grad():
        positions = torch.arange(REFERENCE_BATCH.shape[1]).expand_as(REFERENCE_BATCH)
        return model(input_ids=REFERENCE_BATCH, position_ids=positions, attention_mask=None).float()


def _save_layouts_body(rank: int, world_size: int, directory: str, layouts: Dict[str, Tuple[int, int]],
                       extra: Dict[str, Any], seed: int, model_config: ConanModelConfig,
                       with_1p4b_shapes: bool) -> Dict[str, Any]:
    from megatron_conan.checkpoint.save import save_checkpoint
    from megatron_conan.checkpoint.standalone import build_model
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.sharding import load_full_state_dict

    full = tiny_full_state_dict(model_config, seed)
    result: Dict[str, Any] = {}
    for name, (tp, pp) in layouts.items():
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
        initialize_model_parallel(parallel)
        chunks = build_model(model_config, parallel=parallel)
        load_full_state_dict(chunks, full, model_config)
        save_checkpoint(os.path.join(directory, name), 1, chunks, None, None, model_config, consumed_samples=0,
                        extra_state=extra, keep_last=0)
        if (tp, pp) == (1, 1) and rank == 0:
            result["logits"] = _reference_logits(chunks[0])[..., :model_config.vocab_size]
            if with_1p4b_shapes:
                result["conan_1p4b_meta"] = _conan_1p4b_parameter_shapes()
    return result


def _conan_1p4b_parameter_shapes() -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every parameter of the full-size model built on the meta device (TP1)."""
    from megatron_conan.checkpoint.standalone import build_model
    from megatron_conan.config.model import conan_1p4b

    with torch.device("meta"):
        (model,) = build_model(conan_1p4b())
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def make_tiny_checkpoints(directory: str, tokenizer: str, layouts: Optional[Dict[str, Tuple[int, int]]] = None,
                          seed: int = 0, model_config: Optional[ConanModelConfig] = None,
                          with_1p4b_shapes: bool = False) -> Dict[str, Any]:
    """Save a model (default the tiny recipe) under each layout into ``directory/<name>`` (a
    checkpoints directory with ``latest``), in one spawned world. Returns ``{"paths",
    "full_state_dict", "logits"}``: the weights every layout holds and the TP1 model's logits
    [2, 8, vocab] on :data:`REFERENCE_BATCH` (layouts must include TP1), plus ``"conan_1p4b_meta"``
    with `with_1p4b_shapes`: the parameter shapes of the full-size model (meta device, TP1)."""
    from megatron_conan.distributed.spawn import run_distributed

    layouts = dict(layouts or TINY_LAYOUTS)
    model_config = model_config or tiny()
    world_size = max(tp * pp for tp, pp in layouts.values())
    extra = {"run_config": {"data": {"tokenizer": tokenizer}}, "soft_mask": None}
    results = run_distributed(_save_layouts_body, world_size,
                              args=(directory, layouts, extra, seed, model_config, with_1p4b_shapes))
    return {"paths": {name: os.path.join(directory, name) for name in layouts},
            "full_state_dict": tiny_full_state_dict(model_config, seed), **results[0]}


def copy_checkpoint_with_extra(source: str, destination: str, **extra: Any) -> str:
    """Copy the checkpoints directory `source` to `destination`, replacing entries of every
    checkpoint's ``common.pt["extra"]`` (e.g. ``soft_mask``, ``run_config``)."""
    shutil.copytree(source, destination)
    for entry in os.listdir(destination):
        common_path = os.path.join(destination, entry, "common.pt")
        if os.path.isfile(common_path):
            common = torch.load(common_path, weights_only=True)
            common["extra"] = {**common.get("extra", {}), **extra}
            torch.save(common, common_path)
    return destination


def soft_mask_state(step: int = 0, **config: Any) -> Dict[str, Any]:
    """A checkpoint's ``extra["soft_mask"]`` for a SoftMaskConfig with `config` fields at `step`."""
    from megatron_conan.ops.soft_mask_attention import SoftMaskConfig

    return {"step": step, "config": SoftMaskConfig(**config).to_dict()}


def embedding_run_config(tokenizer: str, query_instruction: str = "Given a question, find the passage that answers it",
                         matryoshka_dims: Sequence[int] = (16, 32), pooling: str = "mean",
                         pool_prompt: bool = False) -> Dict[str, Any]:
    """The parts of a resolved run config the exporters and embedders read."""
    return {"data": {"tokenizer": tokenizer},
            "embedding": {"pooling": pooling, "query_instruction": query_instruction,
                          "matryoshka_dims": list(matryoshka_dims), "pool_prompt": pool_prompt}}


EMBEDDING_TEXTS = (
    "Return a new list containing all items from the iterable in ascending order.",
    "sort",
    "The with statement wraps a block so that cleanup code always runs, even when an exception is raised "
    "inside it; files opened in the header are closed when the block ends. " * 2,
    "中文 日本語 한국어 العربية 😀 12345\t\ttabs  and   spaces\n\nnew lines",
    "Instruct: not a prompt, just text\nQuery: x",
)
"""A ragged batch for embedding comparisons: 1 to ~100 tokens, several scripts, byte fallback."""
REFERENCE_PROMPTS = (("none", None), ("query", None), ("query", 16), ("none", 16))
"""(prompt name, Matryoshka dim) variants :func:`build_conversion_artifacts` embeds EMBEDDING_TEXTS with."""


def _export_body(rank: int, world_size: int, made: Dict[str, Any], embed_checkpoint: str,
                 directory: str) -> Dict[str, Any]:
    from megatron_conan.conversion import export
    from megatron_conan.checkpoint.metadata import read_checkpoint_info
    from megatron_conan.checkpoint.standalone import read_full_state_dict
    from megatron_conan.eval.embedders import CheckpointEmbedder

    hf = {name: export.export_hf(path, os.path.join(directory, f"hf_{name}")) for name, path in made["paths"].items()}
    sentence_transformer = export.export_sentence_transformer(embed_checkpoint, os.path.join(directory, "st"))
    imported = export.import_hf(hf["tp1"], os.path.join(directory, "imported_tp1"))
    reimported = read_full_state_dict(read_checkpoint_info(imported))
    with CheckpointEmbedder(embed_checkpoint) as embedder:
        embeddings = {(prompt, dim): embedder.encode(list(EMBEDDING_TEXTS), prompt_name=prompt, dim=dim,
                                                     batch_size=2)
                      for prompt, dim in REFERENCE_PROMPTS}
        prompts = dict(embedder.prompts)
    return {"hf": hf, "sentence_transformer": sentence_transformer, "imported_tp1": imported,
            "reimported_state_dict": reimported, "embeddings": embeddings, "prompts": prompts}


_BUILT: Dict[str, Dict[str, Any]] = {}


def build_conversion_artifacts(directory: str) -> Dict[str, Any]:
    """Everything the conversion and evaluation tests compare, built once per process and directory:

    - ``tokenizer``; ``checkpoints`` (TP1, TP2, TP2xPP2 of one causal tiny model, see
      :func:`make_tiny_checkpoints`) with ``full_state_dict``, ``logits`` and ``conan_1p4b_meta``;
    - ``embed_checkpoint``: the TP1 checkpoint as a finished embedding run (bidirectional,
      :func:`embedding_run_config`);
    - ``hf``: each LM checkpoint exported to HF; ``sentence_transformer``: the embedding export;
    - ``imported_tp1`` / ``reimported_state_dict``: the TP1 export imported back, and its weights;
    - ``embeddings``: our embedder's vectors of :data:`EMBEDDING_TEXTS` for each of
      :data:`REFERENCE_PROMPTS`, and its ``prompts``.
    """
    from megatron_conan.distributed.spawn import run_distributed

    directory = str(directory)
    if directory in _BUILT:
        return _BUILT[directory]
    os.makedirs(directory, exist_ok=True)
    tokenizer = train_tiny_tokenizer(os.path.join(directory, "tokenizer"))
    made = make_tiny_checkpoints(os.path.join(directory, "checkpoints"), tokenizer, with_1p4b_shapes=True)
    embed_checkpoint = copy_checkpoint_with_extra(
        made["paths"]["tp1"], os.path.join(directory, "embed_checkpoint"),
        soft_mask=soft_mask_state(fixed_a=1.0), run_config=embedding_run_config(tokenizer))
    os.makedirs(os.path.join(directory, "exports"), exist_ok=True)
    exported = run_distributed(_export_body, 1, args=(made, embed_checkpoint, os.path.join(directory, "exports")))[0]
    _BUILT[directory] = {"tokenizer": tokenizer, "checkpoints": made["paths"], "embed_checkpoint": embed_checkpoint,
                         **{key: made[key] for key in ("full_state_dict", "logits", "conan_1p4b_meta")}, **exported}
    return _BUILT[directory]
