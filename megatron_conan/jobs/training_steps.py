"""The main job's training steps: each stage's run config built from the plan, fitted to the host,
and trained on spawned local ranks (pretrain, SFT, embed-weak, embed-sup; the untrained init)."""

from __future__ import annotations

import copy
import json
import logging
from typing import Tuple

from megatron_conan.jobs.workspace import Workspace


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def layout_for_host(world_size: int, values: dict, gpus: int) -> Tuple[int, dict]:
    """A stage's world and run config as this host runs them. Without GPUs, as planned: CPU ranks
    over gloo. With a GPU per rank, as planned over NCCL. With fewer GPUs than the plan's ranks, one
    rank on one GPU (TP=1, DP=1): rather than the whole world on the CPU (README "Parallel
    layouts"). The global batch stays: the per-rank task batches of stage 4 grow by the lost DP."""
    if gpus == 0 or gpus >= world_size:
        return world_size, values
    values = copy.deepcopy(values)
    parallel = values.setdefault("parallel", {})
    data_parallel = world_size // (parallel.get("tensor_parallel", 1) * parallel.get("pipeline_parallel", 1))
    parallel.update(tensor_parallel=1, pipeline_parallel=1)
    embedding = values.get("embedding", {})
    if embedding.get("task_batch_sizes"):
        embedding["task_batch_sizes"] = {task: size * data_parallel for task, size in embedding["task_batch_sizes"].items()}
    return 1, values


def _train_stage(rank: int, world_size: int, stage: str, values: dict) -> dict:
    """run_distributed body: one stage's training on this rank."""
    from megatron_conan.config.run import run_config_from_dict
    from megatron_conan.distributed.device import current_placement
    from megatron_conan.training.trainer import train

    result = train(run_config_from_dict(stage, values), stage=stage)
    return {"losses": result.losses, "steps": result.steps_done, "device": str(current_placement().device)}


class TrainingSteps(Workspace):
    """Each stage step trains from the previous stage's checkpoint and returns its one-line summary."""

    stage_timeout_s: float = 3600.0
    """How long one training stage may run before its world is ended as hung (studies that train
    many times the plan's steps raise it)."""

    def _run_config(self, stage: str, **sections) -> dict:
        plan = self.plan
        values = {
            "run_dir": self.path(stage),
            "model": {"recipe": "tiny", "overrides": {**plan.model, "vocab_size": self.vocab_size}},
            "train": {"seq_length": plan.seq_length, "log_interval": 10, "eval_interval": 0, "progress_bar": True,
                      "seed": 1234 + self.seed},
            "checkpoint": {"save_interval": 0, "keep_last": 1},
            "data": {"tokenizer": self.paths["tokenizer"]},
        }
        for name, section in sections.items():
            values[name] = {**values.get(name, {}), **section}
        from megatron_conan.config.loader import apply_overrides

        apply_overrides(values, [f"{key}={json.dumps(value)}" for key, value in self.overrides.get(stage, {}).items()])
        return values

    def _spawn(self, stage: str, world_size: int, values: dict, timeout_s: int) -> Tuple[int, dict]:
        """Train `stage` on this host's fit of the planned world: (ranks used, rank 0's result)."""
        from megatron_conan.distributed.spawn import run_distributed

        world_size, values = layout_for_host(world_size, values, gpu_count() if self.gpus is None else self.gpus)
        return world_size, run_distributed(_train_stage, world_size, args=(stage, values), timeout_s=timeout_s,
                                           log_level=logging.WARNING)[0]

    def _train(self, stage: str, world_size: int, values: dict) -> dict:
        planned = world_size
        world_size, result = self._spawn(stage, world_size, values, timeout_s=self.stage_timeout_s)
        adapted = world_size != planned
        losses = result["losses"]
        self.results["stages"][stage] = {"run_dir": values["run_dir"], "first_loss": losses[min(losses)],
                                         "last_loss": losses[max(losses)], "steps": result["steps"],
                                         "device": result["device"], "ranks": world_size,
                                         "layout": "TP=1, DP=1: fewer GPUs than the plan's ranks" if adapted else "as planned"}
        return result

    def _loss_line(self, stage: str) -> str:
        entry = self.results["stages"][stage]
        return (f"loss {entry['first_loss']:.3f} -> {entry['last_loss']:.3f} over {entry['steps']} steps "
                f"on {entry['ranks']} x {entry['device']}"
                + ("" if entry["layout"] == "as planned" else f" ({entry['layout']})"))

    def random_init(self) -> None:
        """The pretraining run's initial weights, saved untrained (0 steps, the same seed and layout):
        the table's random-init row, what every stage must beat."""
        values = self._run_config("random_init", parallel={"tensor_parallel": 2},
                                  train={"train_steps": 0, "global_batch_size": self.plan.lm_batch,
                                         "micro_batch_size": self.plan.lm_batch // 2},
                                  data={"kind": "blended", "blend": self._blend()})
        self._spawn("pretrain", 2, values, timeout_s=600)

    def _blend(self) -> dict:
        return {"sources": [{"name": "docstrings", "prefix": self.path("indexed", "docstrings"), "weight": 0.8},
                            {"name": "sft_text", "prefix": self.path("indexed", "sft_text"), "weight": 0.2}],
                "split": "100,0,0", "cache_dir": self.path("index_cache")}

    def pretrain(self) -> str:
        plan = self.plan
        self.random_init()
        blend = self._blend()
        self._train("pretrain", 2, self._run_config(
            "pretrain", parallel={"tensor_parallel": 2},
            optimizer={"lr": plan.pretrain_lr, "warmup_fraction": 0.05, "decay_style": "cosine",
                       "min_lr": plan.pretrain_lr / 10},
            train={"train_steps": plan.pretrain_steps, "global_batch_size": plan.lm_batch,
                   "micro_batch_size": plan.lm_batch // 2},
            data={"kind": "blended", "blend": blend}))
        return f"TP=2, blended docstrings 0.8 + SFT text 0.2, {self._loss_line('pretrain')}"

    def sft(self) -> str:
        plan = self.plan
        self._train("sft", 2, self._run_config(
            "sft", parallel={"tensor_parallel": 2},
            optimizer={"lr": plan.sft_lr, "warmup_fraction": 0.05, "min_lr": plan.sft_lr / 10},
            train={"train_steps": plan.sft_steps, "global_batch_size": plan.lm_batch,
                   "micro_batch_size": plan.lm_batch // 2},
            checkpoint={"load_dir": self.path("pretrain", "checkpoints")},
            data={"kind": "sft", "sft_prefix": self.path("indexed", "sft"), "split": "100,0,0"}))
        return f"TP=2, loss on the answers only, {self._loss_line('sft')}"

    def _embedding(self, **extra) -> dict:
        plan = self.plan
        return {"max_query_length": plan.max_query_length, "max_passage_length": plan.max_passage_length,
                "query_instruction": self.manifest["instructions"]["retrieval"],
                "packing": plan.max_tokens_per_row > 0, "max_tokens_per_row": max(plan.max_tokens_per_row, 1),
                **extra}

    def embed_weak(self) -> str:
        plan = self.plan
        self._train("embed-weak", 2, self._run_config(
            "embed-weak", model={"soft_mask": {"schedule": "linear", "position_scale": "len_over_pos"}},
            optimizer={"lr": plan.weak_lr, "warmup_fraction": 0.05, "min_lr": plan.weak_lr / 10,
                       "clip_grad": plan.clip_grad},
            train={"train_steps": plan.weak_steps, "global_batch_size": plan.weak_batch},
            checkpoint={"load_dir": self.path("sft", "checkpoints")},
            data={"kind": "contrastive", "contrastive_prefix": self.path("indexed", "pairs")},
            embedding=self._embedding(temperature=plan.temperature)))
        return f"DP=2, soft mask a(t) 0 -> 1, in-batch negatives of both ranks, {self._loss_line('embed-weak')}"


    def embed_sup(self) -> str:
        plan = self.plan
        self._train("embed-sup", 2, self._run_config(
            # gentle: measured, lr 1e-3 for 120 steps on these 1.5k supervised pairs (other module
            # families than the held-out ones) lowers held-out nDCG below stage 3's
            "embed-sup", optimizer={"lr": plan.sup_lr, "warmup_fraction": 0.05, "min_lr": plan.sup_lr / 10,
                                    "clip_grad": plan.clip_grad},
            train={"train_steps": plan.sup_steps, "global_batch_size": 2 * plan.sup_batches["retrieval"]},
            checkpoint={"load_dir": self.path("embed-weak", "checkpoints")},
            data={"kind": "contrastive", "contrastive_prefix": self.path("indexed", "supervised")},
            embedding=self._embedding(temperature=plan.temperature, num_negatives=plan.num_negatives,
                                      task_batch_sizes=plan.sup_batches, matryoshka_dims=plan.matryoshka_dims,
                                      # the held-out task is retrieval: most steps are retrieval steps
                                      task_weights=plan.sup_task_weights)))
        return f"DP=2, DHNM hard negatives, Matryoshka {plan.matryoshka_dims}, {self._loss_line('embed-sup')}"

