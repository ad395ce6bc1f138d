"""The LR schedule: no update runs at lr 0, the logged lr is the one the update applied, and a
restored schedule continues where it stopped."""

import json
import math
import os

import pytest
import torch

from megatron_conan.checkpoint.load import restore_scheduler
from megatron_conan.config.loader import from_dict
from megatron_conan.testing.distributed import run_distributed
from megatron_conan.config.run import LanguageModelConfig
from megatron_conan.training.trainer import build_scheduler


def _config(**optimizer) -> LanguageModelConfig:
    return from_dict(LanguageModelConfig, {"run_dir": "unused", "model": {"recipe": "tiny"},
                                 "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_fraction": 0.1,
                                               "decay_style": "cosine", **optimizer},
                                 "data": {"kind": "synthetic"}})


def _applied(scheduler, optimizer, updates):
    """The lr each update runs at, stepping the schedule after each as the loop does."""
    seen = []
    for _ in range(updates):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return seen


def test_the_first_update_warms_up_and_the_last_reaches_min_lr():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, _config().optimizer, total_steps=20)  # warm-up: 2 updates
    lrs = _applied(scheduler, optimizer, 20)
    assert lrs[0] == pytest.approx(5e-4)  # 1/2 of the peak, not 0
    assert lrs[1] == pytest.approx(1e-3)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx(1e-4)


def test_without_warm_up_update_k_runs_at_the_decay_after_k_steps():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, _config(warmup_fraction=0.0).optimizer, total_steps=10)
    lrs = _applied(scheduler, optimizer, 10)
    cosine = [1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * k / 10)) for k in range(1, 11)]
    assert lrs == pytest.approx(cosine)


def test_a_restored_schedule_continues_the_uninterrupted_one():
    def fresh():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, build_scheduler(optimizer, _config().optimizer, total_steps=20)

    optimizer, scheduler = fresh()
    uninterrupted = _applied(scheduler, optimizer, 20)
    optimizer, scheduler = fresh()
    _applied(scheduler, optimizer, 7)
    state = scheduler.state_dict()
    optimizer, scheduler = fresh()
    restore_scheduler(scheduler, state)
    assert _applied(scheduler, optimizer, 13) == pytest.approx(uninterrupted[7:])


def _run(rank, world_size, run_dir):
    from megatron_conan.training.trainer import train

    cfg = from_dict(LanguageModelConfig, {"run_dir": run_dir, "model": {"recipe": "tiny"}, "data": {"kind": "synthetic"},
                                "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_fraction": 0.25},
                                "train": {"train_steps": 4, "global_batch_size": 2, "micro_batch_size": 2,
                                          "seq_length": 16, "log_interval": 1, "eval_interval": 0},
                                "checkpoint": {"save_interval": 0}})
    train(cfg, stage="pretrain")


def test_the_logged_lr_is_the_lr_the_update_applied(tmp_path):
    run_distributed(_run, 1, args=(str(tmp_path),))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as handle:
        logged = [json.loads(line)["lr"] for line in handle]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    expected = _applied(build_scheduler(optimizer, _config(warmup_fraction=0.25).optimizer, total_steps=4), optimizer, 4)
    assert logged == pytest.approx(expected)
    assert logged[0] > 0
