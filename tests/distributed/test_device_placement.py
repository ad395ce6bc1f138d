"""Issue 13 item 1: every batch handed to the model and every collective of our code goes through one
device seam (``distributed/device.py``), which puts them on the backend's device (CUDA under NCCL,
CPU under gloo) and refuses a tensor on the wrong device by name."""

import ast
import os

import pytest
import torch

from megatron_conan.distributed.device import DevicePlacementError, Placement, backend_device
from megatron_conan.testing.distributed import run_distributed

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "megatron_conan")
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
               "gather", "scatter", "broadcast_object_list", "all_gather_object"}


def _direct_collective_calls(path):
    """(line, call) of `dist.<collective>(...)` / `torch.distributed.<collective>(...)` in a file."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed"):
                found.append((node.lineno, f"{owner}.{node.func.attr}"))
    return found


def test_library_issues_collectives_only_through_the_seam():
    offenders = []
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(directory, name)
            if not name.endswith(".py") or path.endswith(os.path.join("distributed", "device.py")):
                continue
            offenders += [f"{os.path.relpath(path, PACKAGE)}:{line} {call}"
                          for line, call in _direct_collective_calls(path)]
    assert offenders == [], "collectives outside the device seam:\n" + "\n".join(offenders)


def test_wrong_device_is_refused_by_name():
    placement = Placement(torch.device("cpu"))
    with pytest.raises(DevicePlacementError, match="all_reduce: tensor on meta"):
        placement.all_reduce(torch.zeros(2, device="meta"))


def test_backend_decides_the_device(monkeypatch):
    assert backend_device("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert backend_device("nccl") == torch.device("cuda", 3)


def test_to_device_moves_nested_batches():
    from megatron_conan.data.contrastive import ContrastiveBatch

    placement = Placement(torch.device("cpu"))
    batch = ContrastiveBatch("pair", torch.arange(2), torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 2]),
                             torch.zeros(2, 4, dtype=torch.long), torch.tensor([4, 1]))
    with placement.recording() as records:
        moved = placement.to_device({"batch": batch, "list": [torch.ones(1)]})
    assert isinstance(moved["batch"], ContrastiveBatch) and moved["batch"].task == "pair"
    assert sorted(shape for what, _, shape, _ in records if what == "batch") == sorted(
        [(2,), (2, 3), (2,), (2, 4), (2,), (1,)])


def _recorded_training_body(rank, world_size, cfg_dict):
    from megatron_conan.config.loader import from_dict
    from megatron_conan.distributed.device import current_placement
    from megatron_conan.testing.placement import recording_devices
    from megatron_conan.config.run import LanguageModelConfig
    from megatron_conan.training.trainer import train

    with recording_devices() as seen:
        train(from_dict(LanguageModelConfig, cfg_dict))
    return {"records": seen.records, "fed": seen.fed, "device": current_placement().device}


def test_training_moves_every_batch_and_collective_through_the_seam(tmp_path):
    import yaml

    from megatron_conan.config.loader import apply_overrides

    with open(os.path.join(os.path.dirname(PACKAGE), "examples", "tiny", "pretrain.yaml")) as handle:
        values = yaml.safe_load(handle)
    values["run_dir"] = str(tmp_path)
    apply_overrides(values, ["train.train_steps=2", "train.eval_interval=0", "checkpoint.save_interval=0"])
    results = run_distributed(_recorded_training_body, 2, args=(values,))
    for result in results:
        records, device = result["records"], result["device"]
        assert records, "nothing passed through the seam"
        assert all(recorded_device == device for _, recorded_device, _, _ in records), records
        kinds = {what for what, _, _, _ in records}
        assert {"batch", "all_reduce"} <= kinds, kinds  # batches; loss, token and preemption reductions
        moved = {pointer for what, _, _, pointer in records if what == "batch"}
        assert len(result["fed"]) == 2 * 2  # 2 steps x 2 micro-batches per DP rank, each fed once
        for pointers in result["fed"]:
            assert set(pointers) <= moved, "a batch reached the model without passing the seam"


def test_a_cuda_placement_names_the_ranks_gpu(monkeypatch):
    """torch.device("cuda") != torch.device("cuda:0"): an index-less device would refuse every tensor."""
    from megatron_conan.data.dhnm import DHNMState

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert Placement("cuda").device == torch.device("cuda", 1)
    assert Placement(torch.device("cuda", 0)).device == torch.device("cuda", 0)
    assert DHNMState([3, 3], 2, placement="cuda").placement().device == torch.device("cuda", 1)
