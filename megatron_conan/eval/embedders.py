"""Texts -> embeddings from one of our checkpoints or an exported sentence-transformers directory, one
interface for conan-encode, conan-eval, the MTEB wrapper and the hard-negative miner::

    with load_embedder("runs/embed_sup") as embedder:           # or an exported directory
        vectors = embedder.encode(texts, prompt_name="query", dim=512)   # [n, 512] float32, unit norm

A checkpoint is loaded in this process as a TP1/PP1 model (whatever layout wrote it) with the
attention it was trained with: the soft mask frozen at the checkpoint's step (causal for pretrain /
SFT checkpoints). Texts are tokenised as the embedding stages train: prompt + text, cut to
``max_length - 1`` tokens, then EOD; batches are formed by length (longest first, so the padded
work is small and the memory peak comes first) and the original order is restored.

Prompts: ``query`` is the instruction template around the run's query instruction
(``Instruct: ...\\nQuery: ``), ``document`` is empty, exactly as the sentence-transformers export
writes them, so a checkpoint and its export embed identically. Matryoshka: ``dim`` keeps the first
`dim` features and re-normalises.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import weakref
from typing import Dict, List, Optional, Sequence

import numpy
import torch

from megatron_conan.errors import InputError

logger = logging.getLogger(__name__)

PROMPT_NAMES = ("query", "document", "none")
"""Prompt names every embedder understands (``none``: no prompt)."""


def truncate_and_normalize(embeddings: numpy.ndarray, dim: Optional[int]) -> numpy.ndarray:
    """The first `dim` features of unit vectors, re-normalised (all of them when `dim` is None)."""
    if dim is None or dim == embeddings.shape[1]:
        return embeddings
    prefix = embeddings[:, :dim]
    norms = numpy.linalg.norm(prefix, axis=1, keepdims=True)
    return (prefix / numpy.maximum(norms, 1e-12)).astype(numpy.float32)


class Embedder(abc.ABC):
    """Unit-norm text embeddings with named prompts and Matryoshka truncation."""

    name: str
    """What to call the model in reports (its path)."""
    dim: int
    """Full embedding width."""
    prompts: Dict[str, str]
    """Prompt texts by name (``query``, ``document``)."""
    matryoshka_dims: List[int]
    """Truncations the model was trained for (the full width included)."""

    def prompt_text(self, prompt_name: Optional[str]) -> str:
        """The text a prompt name stands for (``none`` or None: no prompt)."""
        if prompt_name in (None, "none"):
            return ""
        if prompt_name not in self.prompts:
            raise InputError(f"unknown prompt {prompt_name!r}; {self.name} has {sorted(self.prompts) + ['none']}")
        return self.prompts[prompt_name]

    def check_dim(self, dim: Optional[int]) -> Optional[int]:
        if dim is not None and not 1 <= dim <= self.dim:
            raise InputError(f"dim must be in [1, {self.dim}] (the embedding width), got {dim}")
        if dim is not None and self.matryoshka_dims and dim not in self.matryoshka_dims:
            logger.warning("dim %d is not one of the Matryoshka dims the model was trained for %s",
                           dim, self.matryoshka_dims)
        return dim

    def encode(self, texts: Sequence[str], prompt_name: Optional[str] = None, prompt_text: Optional[str] = None,
               batch_size: int = 32, dim: Optional[int] = None, show_progress: bool = False) -> numpy.ndarray:
        """[len(texts), dim or self.dim] float32 unit vectors. `prompt_text` (literal) wins over
        `prompt_name`."""
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        dim = self.check_dim(dim)
        prefix = prompt_text if prompt_text is not None else self.prompt_text(prompt_name)
        if not texts:
            return numpy.zeros((0, dim or self.dim), dtype=numpy.float32)
        return truncate_and_normalize(self._encode(list(texts), prefix, batch_size, show_progress), dim)

    @abc.abstractmethod
    def _encode(self, texts: List[str], prefix: str, batch_size: int, show_progress: bool) -> numpy.ndarray:
        """Full-width unit embeddings of prefix + text, in input order."""

    def close(self) -> None:
        """Release what loading took (process groups of a checkpoint embedder)."""

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointEmbedder(Embedder):
    """One of our checkpoints, in this process (see the module docstring)."""

    def __init__(self, checkpoint: str, tokenizer: Optional[str] = None, pooling: Optional[str] = None,
                 query_instruction: Optional[str] = None, max_length: Optional[int] = None, precision: Optional[str] = None,
                 device: Optional[str] = None, tokenizer_threads: int = 1, max_tokens_per_row: int = 0):
        """`max_tokens_per_row` > 0: each batch runs as packed rows of that many tokens (models/packing.py)
        instead of padded to its longest text; the vectors are the same."""
        from megatron_conan.conversion.attention import checkpoint_attention
        from megatron_conan.conversion.export import embedding_options, query_prompt, resolve_tokenizer, text_length
        from megatron_conan.checkpoint.metadata import read_checkpoint_info
        from megatron_conan.checkpoint.standalone import load_checkpoint_model, model_parallel_world
        from megatron_conan.data.tokenizer import ConanTokenizer
        from megatron_conan.distributed.device import Placement, current_placement
        from megatron_conan.ops.soft_mask_attention.core_attention import soft_mask_core_attention_spec

        info = read_checkpoint_info(checkpoint)
        max_length = text_length(info.model_config, max_length, info)
        self.tokenizer = ConanTokenizer(resolve_tokenizer(info, tokenizer))
        options = embedding_options(info, pooling, query_instruction, None)
        self.attention = checkpoint_attention(info.soft_mask, info.path)
        self.name = info.path
        self.dim = info.model_config.hidden_size
        self.pooling = options["pooling"]
        self.pool_prompt = options["pool_prompt"]
        self.prompts = {"query": query_prompt(options["query_instruction"]), "document": ""}
        self.matryoshka_dims = list(options["matryoshka_dims"])
        self.max_length = max_length
        self.tokenizer_threads = tokenizer_threads
        if max_tokens_per_row < 0:
            raise InputError(f"max tokens per row must be >= 0, got {max_tokens_per_row}")
        self.max_tokens_per_row = max_tokens_per_row
        self._world = contextlib.ExitStack()
        self._world.enter_context(model_parallel_world())
        # an embedder never closed still tears its world down: when it is collected, or at exit
        # while the modules it needs are still there (a generator left to interpreter shutdown
        # failed in its clean-up with "Exception ignored ... model_parallel_world")
        self._close_world = weakref.finalize(self, self._world.close)
        # the world's device unless one is asked for: the GPU of this rank under NCCL, the CPU under
        # gloo (a world whose GPUs are hidden), so weights and batches never sit on two devices
        self.placement = Placement(device) if device else current_placement()
        self.device = self.placement.device
        precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        try:
            model = load_checkpoint_model(info, precision,
                                          soft_mask_core_attention_spec(self.attention.inference_config()))
            if precision != "fp32":
                from megatron.core.transformer.module import Float16Module

                model = Float16Module(model.config, model)
            self.model = model.to(self.device).eval()
        except BaseException:
            self._close_world()
            raise
        logger.info("loaded %s (step %d, %s attention, %s pooling)", info.path, info.step,
                    self.attention.describe(), self.pooling)

    def tokenize(self, texts: List[str], prefix: str) -> List[List[int]]:
        """Token ids as training builds them: prefix + text, cut to max_length - 1, then EOD."""
        ids = self.tokenizer.encode_batch([prefix + text for text in texts], num_threads=self.tokenizer_threads)
        return [sequence[:self.max_length - 1] + [self.tokenizer.eod] for sequence in ids]

    @torch.inference_mode()
    def _encode(self, texts: List[str], prefix: str, batch_size: int, show_progress: bool) -> numpy.ndarray:
        from tqdm.auto import tqdm

        from megatron_conan.models.embedder import embed

        sequences = self.tokenize(texts, prefix)
        # the prompt's tokens, counted alone as sentence-transformers counts them (include_prompt)
        prompt_tokens = len(self.tokenizer.encode(prefix)) if prefix and not self.pool_prompt else 0
        order = sorted(range(len(sequences)), key=lambda index: -len(sequences[index]))
        output = numpy.empty((len(sequences), self.dim), dtype=numpy.float32)
        for start in tqdm(range(0, len(order), batch_size), desc="encoding", unit="batch", disable=not show_progress):
            rows = order[start:start + batch_size]
            lengths = torch.tensor([len(sequences[row]) for row in rows])
            input_ids = torch.full((len(rows), int(lengths.max())), self.tokenizer.pad, dtype=torch.long)
            for slot, row in enumerate(rows):
                input_ids[slot, :len(sequences[row])] = torch.tensor(sequences[row])
            starts = torch.full_like(lengths, prompt_tokens) if prompt_tokens else None
            input_ids, lengths, starts = self.placement.to_device((input_ids, lengths, starts))
            vectors = embed(self.model, input_ids, lengths, self.pooling, starts=starts,
                            max_tokens_per_row=self.max_tokens_per_row)  # [b, h]
            output[rows] = vectors.float().cpu().numpy()
        return output

    def close(self) -> None:
        self.model = None
        self._close_world()


class SentenceTransformerEmbedder(Embedder):
    """An exported sentence-transformers directory (its attention checked against its config)."""

    def __init__(self, path: str, device: Optional[str] = None):
        from sentence_transformers import SentenceTransformer

        from megatron_conan.conversion.attention import check_attention_matches_config
        from megatron_conan.conversion.export import EXPORT_RECORD

        try:  # weights from safetensors only: a pickled .bin from someone else could run code
            self.model = SentenceTransformer(path, device=device, local_files_only=True,
                                             model_kwargs={"use_safetensors": True})
        except (OSError, ValueError) as error:
            raise InputError(f"{path} cannot be loaded as a sentence-transformers model with safetensors "
                             f"weights: {' '.join(str(error).split())}") from None
        if hasattr(self.model[0], "auto_model"):
            check_attention_matches_config(self.model, path)
        self.name = path
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self.prompts = dict(self.model.prompts)
        self.prompts.setdefault("document", "")
        record_path = os.path.join(path, EXPORT_RECORD)
        self.matryoshka_dims = []
        if os.path.isfile(record_path):
            with open(record_path, encoding="utf-8") as handle:
                self.matryoshka_dims = list(json.load(handle).get("matryoshka_dims") or [])

    def _encode(self, texts: List[str], prefix: str, batch_size: int, show_progress: bool) -> numpy.ndarray:
        embeddings = self.model.encode(texts, prompt=prefix, batch_size=batch_size, convert_to_numpy=True,
                                       normalize_embeddings=True, show_progress_bar=show_progress)
        return numpy.asarray(embeddings, dtype=numpy.float32)


def is_sentence_transformer_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "modules.json"))


def load_embedder(path: str, **options) -> Embedder:
    """A SentenceTransformerEmbedder for an exported directory (``modules.json``), else a
    CheckpointEmbedder (options: tokenizer, pooling, query_instruction, max_length, precision,
    device, max_tokens_per_row); `device` applies to both."""
    if not os.path.exists(path):
        raise InputError(f"model {path} does not exist")
    if is_sentence_transformer_dir(path):
        unused = sorted(key for key, value in options.items() if value is not None and key != "device")
        if unused:
            logger.warning("%s is an exported directory: %s apply only to checkpoints and are ignored",
                           path, ", ".join(unused))
        return SentenceTransformerEmbedder(path, device=options.get("device"))
    return CheckpointEmbedder(path, **{key: value for key, value in options.items() if value is not None})
