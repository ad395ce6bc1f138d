"""Which attention a checkpoint was trained with, whether a stock Hugging Face Llama can express it,
and a probe that tells what attention a loaded HF model actually runs.

A checkpoint's attention is its soft mask at its step (``common.pt["extra"]["soft_mask"]``; absent
for pretraining and SFT: causal). A stock HF Llama has two modes: causal (the default) and, from
transformers 5.2 on, bidirectional with ``"is_causal": false`` in config.json. So an export is exact
only when a = 0 (causal) or a = 1 with a position scale that opens every row (``len_over_pos``,
``none``); anything between (a stage-3 checkpoint mid-schedule, ``pos_over_len``) is refused.

The probe matters because transformers versions before 5.2 read the same config.json and silently
ignore ``is_causal``: :func:`check_attention_matches_config` compares what the model does with what
its config asks for and raises :class:`AttentionMismatchError` on a mismatch (the tools run it
whenever they load an exported directory; users can call it after ``SentenceTransformer(path)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from megatron_conan.errors import InputError
from megatron_conan.ops.soft_mask_attention.schedule import SoftMaskConfig, SoftMaskSchedule

BIDIRECTIONAL_SCALES = ("len_over_pos", "none")
"""Position scales whose rows are all fully open at a = 1."""
MIN_TRANSFORMERS_FOR_IS_CAUSAL = "5.2"


class UnexportableAttentionError(InputError):
    """The checkpoint's soft mask is neither exactly causal nor exactly bidirectional."""


class AttentionMismatchError(InputError):
    """A loaded HF model does not attend the way its config.json says (an old transformers)."""


@dataclasses.dataclass(frozen=True)
class CheckpointAttention:
    """The attention of a checkpoint at its step."""

    config: SoftMaskConfig
    """Its soft-mask config (``SoftMaskConfig.causal()`` for pretrain / SFT checkpoints)."""
    a: float
    """a(t) at the checkpoint's step."""

    @property
    def is_causal(self) -> bool:
        return self.a == 0.0

    @property
    def is_bidirectional(self) -> bool:
        return self.a == 1.0 and self.config.position_scale in BIDIRECTIONAL_SCALES

    def inference_config(self, backend: str = "auto") -> SoftMaskConfig:
        """A fixed-a config reproducing this attention (the schedule frozen at the step)."""
        return SoftMaskConfig(fixed_a=self.a, position_scale=self.config.position_scale, backend=backend)

    def describe(self) -> str:
        if self.is_causal:
            return "causal"
        if self.is_bidirectional:
            return "bidirectional"
        return f"soft mask a={self.a:.4g} ({self.config.position_scale})"


def checkpoint_attention(soft_mask_state: Optional[dict], where: str) -> CheckpointAttention:
    """The attention described by a checkpoint's ``extra["soft_mask"]`` (None: causal)."""
    if soft_mask_state is None:
        return CheckpointAttention(SoftMaskConfig.causal(), 0.0)
    try:
        config = SoftMaskConfig(**dict(soft_mask_state["config"]))
        a = SoftMaskSchedule(config, int(soft_mask_state["step"])).a
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{where}: unreadable soft-mask state {soft_mask_state!r} ({error})") from None
    return CheckpointAttention(config, a)


def export_is_causal(attention: CheckpointAttention, where: str) -> bool:
    """The ``is_causal`` an exact HF export of `attention` needs; refuses what HF cannot express."""
    if attention.is_causal:
        return True
    if attention.is_bidirectional:
        return False
    raise UnexportableAttentionError(
        f"{where}: its attention is a {attention.describe()}, which a stock Hugging Face model cannot "
        "express (it is either causal or bidirectional); export a checkpoint at the end of the "
        "soft-mask schedule (a = 1 with len_over_pos or none) or a causal one")


@torch.no_grad()
def attends_bidirectionally(model: torch.nn.Module) -> bool:
    """Whether the first position's output of an HF decoder depends on a later token."""
    base = getattr(model, "base_model", model)
    vocab = int(base.config.vocab_size)
    middle = max(vocab // 2, 4)
    first = torch.tensor([[middle, middle + 1, middle + 2]]) % vocab
    second = first.clone()
    second[0, -1] = (second[0, -1] + 1) % vocab
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    try:
        outputs = [base(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device))
                   .last_hidden_state[0, 0].float() for ids in (first, second)]
    finally:
        base.train(was_training)
    scale = outputs[0].abs().max().clamp(min=1e-12)
    return bool(((outputs[0] - outputs[1]).abs().max() / scale) > 1e-5)


def check_attention_matches_config(model: torch.nn.Module, path: str) -> None:
    """Raise AttentionMismatchError when `model` (HF, or a SentenceTransformer), loaded from the
    directory `path`, does not attend the way ``path/config.json`` asks (``is_causal``; the loaded
    model's config when the directory has none)."""
    hf_model = _hf_model_of(model)
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            wants_causal = bool(json.load(handle).get("is_causal", True))
    else:
        wants_causal = bool(getattr(hf_model.config, "is_causal", True))
    if wants_causal == (not attends_bidirectionally(hf_model)):
        return
    import transformers

    asked = "causal" if wants_causal else "bidirectional (is_causal: false)"
    raise AttentionMismatchError(
        f"{path}: config.json asks for {asked} attention but the model loaded by transformers "
        f"{transformers.__version__} does not attend that way; bidirectional Llama models need "
        f"transformers>={MIN_TRANSFORMERS_FOR_IS_CAUSAL}")


def _hf_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a SentenceTransformer (its first module), or `model` itself."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    first = model[0] if hasattr(model, "__getitem__") else None
    hf_model = getattr(first, "auto_model", None)
    if hf_model is None:
        raise TypeError(f"expected a transformers model or a SentenceTransformer, got {type(model).__name__}")
    return hf_model
