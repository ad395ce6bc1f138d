"""The language-model stages (1 pretrain, 2 SFT) as a plug-in of the shared loop.

Data (``data/lm_datasets.py``): blended indexed sources, SFT examples or synthetic motifs; its
position is one number, ``consumed_samples``. The step runs megatron-core's pipeline schedule (any
TP/PP/VPP/SP layout) with the per-token loss of ``losses/lm.py``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional

import torch

from megatron_conan.data.lm_datasets import build_lm_datasets, data_prefixes, step_microbatches
from megatron_conan.data.provenance import check_tokenizer
from megatron_conan.errors import ConfigError
from megatron_conan.training.lm_step import attach_loss_normalizer, lm_forward_step
from megatron_conan.training.megatron_step import evaluate_loss, reduce_reports, run_schedule
from megatron_conan.training.preflight import load_checked_tokenizer
from megatron_conan.training.stage import Stage, StageContext, StageStepOutput

logger = logging.getLogger(__name__)


class LanguageModelStage(Stage):
    """Next-token cross-entropy over fixed-length sequences (pretrain, SFT).

    `forward_step_func` replaces megatron-core's forward step of the schedule (``lm_forward_step``);
    tests poison chosen steps' losses through it.
    """

    evaluates = True

    def __init__(self, name: str = "pretrain", forward_step_func: Optional[Callable] = None):
        self.name = name
        self.forward_step_func = forward_step_func or lm_forward_step
        self.consumed_samples = 0
        self.tokenizer = None
        self.train_ds = self.valid_ds = None

    def check_config(self, cfg) -> None:
        if cfg.model.soft_mask is not None:
            # next-token prediction: any a > 0 lets a position see the tokens it predicts
            raise ConfigError(f"model.soft_mask is for the embedding stages; the {self.name} stage trains "
                              "next-token prediction, where any bidirectional attention leaks the future "
                              "tokens into the loss: remove model.soft_mask")
        if cfg.data.kind == "sft" and not cfg.data.sft_prefix:
            raise ConfigError("data.sft_prefix is required for data.kind=sft")

    def check_inputs(self, cfg, model_config) -> None:
        if cfg.data.kind == "synthetic":
            return
        self.tokenizer = load_checked_tokenizer(cfg, model_config)
        for prefix in data_prefixes(cfg):
            check_tokenizer(prefix, self.tokenizer)

    def setup(self, ctx: StageContext) -> None:
        train = ctx.cfg.train
        train.num_microbatches(ctx.data_parallel_size)  # refuses a global batch the layout cannot split
        # Every evaluation reads the same first `eval_steps` global batches of the validation split.
        eval_batches = train.eval_steps if train.eval_interval else 0
        train_ds, valid_ds = build_lm_datasets(ctx.cfg, ctx.model_config, self.tokenizer,
                                               ctx.total_steps * train.global_batch_size,
                                               eval_batches * train.global_batch_size)
        if eval_batches and (valid_ds is None or len(valid_ds) == 0):
            raise ConfigError("train.eval_interval is set but the data has no validation split "
                              "(data.split / data.blend.split gives it no share)")
        self.use_data(train_ds, valid_ds, global_batch=train.global_batch_size, micro_batch=train.micro_batch_size,
                      seq_length=train.seq_length, data_parallel_size=ctx.data_parallel_size,
                      eval_steps=train.eval_steps)

    def use_data(self, train_ds, valid_ds, global_batch: int, micro_batch: int, seq_length: int,
                 data_parallel_size: int, eval_steps: int = 0) -> None:
        """Read `train_ds` (and `valid_ds`): what :meth:`setup` does with the run's data section, and
        what a harness that brings its own samples calls instead."""
        self.train_ds, self.valid_ds = train_ds, valid_ds
        self.global_batch, self.micro_batch, self.seq_length = global_batch, micro_batch, seq_length
        self.num_microbatches = global_batch // (micro_batch * data_parallel_size)
        self.eval_steps = eval_steps

    def _microbatches(self, ctx: StageContext, dataset, consumed: int) -> List[Dict[str, torch.Tensor]]:
        batches = step_microbatches(dataset, consumed, self.global_batch, self.micro_batch,
                                    ctx.data_parallel_rank, ctx.data_parallel_size)
        return [ctx.placement.to_device(batch) for batch in batches]

    def train_step(self, ctx: StageContext, step: int, batch: Optional[object] = None) -> StageStepOutput:
        # no loader (build_loader): the batches are read here, from consumed_samples
        microbatches = self._microbatches(ctx, self.train_ds, self.consumed_samples)
        attach_loss_normalizer(microbatches, ctx.placement)
        reported = reduce_reports(run_schedule(
            self.forward_step_func, [iter(microbatches) for _ in ctx.chunks], ctx.chunks,
            self.num_microbatches, self.seq_length, self.micro_batch, forward_only=False))
        self.consumed_samples += self.global_batch
        loss = reported.pop("lm loss", float("nan"))
        loss_tokens = reported.pop("lm loss count", float("nan"))
        return StageStepOutput(loss=loss, samples=self.global_batch,
                               tokens=self.global_batch * self.seq_length,
                               metrics={"loss_tokens": loss_tokens, **reported})

    def evaluate(self, ctx: StageContext, step: int) -> Dict[str, float]:
        losses = []
        for index in range(self.eval_steps):
            microbatches = self._microbatches(ctx, self.valid_ds, index * self.global_batch)
            losses.append(evaluate_loss(self.forward_step_func, [iter(microbatches) for _ in ctx.chunks], ctx.chunks,
                                        self.num_microbatches, self.seq_length, self.micro_batch))
        return {"eval_loss": sum(losses) / len(losses) if losses else math.nan}

    def state_dict(self) -> Dict[str, Any]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
