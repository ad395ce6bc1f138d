"""Issue 18 item 1: a world with more ranks than GPUs never mixes devices. A spawned world that
cannot have a GPU per rank runs wholly on the CPU over gloo (its ranks start with CUDA hidden); a
launcher that starts more processes on a node than it has GPUs is refused in one line. The GPU count
is faked: these tests play a 1-GPU host on any machine."""

import os

import pytest
import torch

from megatron_conan.distributed import spawn
from megatron_conan.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def one_gpu_host(monkeypatch):
    monkeypatch.setattr(spawn, "visible_gpu_count", lambda: 1)


def test_backend_of_a_spawned_world_on_one_gpu(one_gpu_host):
    assert spawn.world_backend(1) == "nccl"
    assert spawn.world_backend(2) == "gloo"
    with pytest.raises(ValueError, match="nccl needs one GPU per rank: 2 ranks, 1 GPU"):
        spawn.world_backend(2, "nccl")


def test_gloo_children_start_with_cuda_hidden(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with spawn._children_environment("gloo"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    with spawn._children_environment("nccl"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def _stage_on_one_device(rank, world_size, values):
    """Train a few steps, recording the device of the weights, of every tensor fed to the model and
    of every batch and collective passing the placement seam."""
    import torch.distributed as dist

    from megatron_conan.config.loader import from_dict
    from megatron_conan.testing.placement import recording_devices
    from megatron_conan.config.run import LanguageModelConfig
    from megatron_conan.training.trainer import train

    with recording_devices() as seen:
        train(from_dict(LanguageModelConfig, values))
    return {"cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda_available": torch.cuda.is_available(),
            "backend": dist.get_backend(), "devices": sorted(map(str, seen.devices())), "kinds": sorted(seen.kinds())}


def test_two_rank_stage_on_a_one_gpu_host_stays_on_one_device(one_gpu_host, tmp_path):
    import yaml

    from megatron_conan.config.loader import apply_overrides

    with open(os.path.join(REPO, "examples", "tiny", "pretrain.yaml")) as handle:
        values = yaml.safe_load(handle)
    values["run_dir"] = str(tmp_path)
    apply_overrides(values, ["train.train_steps=2", "train.eval_interval=0", "checkpoint.save_interval=0",
                             "parallel.tensor_parallel=2"])
    for result in spawn.run_distributed(_stage_on_one_device, 2, args=(values,)):
        assert result["cuda_visible"] == "" and not result["cuda_available"], result
        assert result["backend"] == "gloo"
        assert result["devices"] == ["cpu"], result  # weights, model inputs, batches, collectives
        assert {"batch", "all_reduce"} <= set(result["kinds"]), result


def test_launcher_with_more_processes_than_gpus_is_refused_in_one_line(monkeypatch):
    from megatron_conan.distributed import parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError) as raised:
        parallel.init_process_group_from_env()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("LOCAL_RANK 1 has no GPU: this node shows 1 CUDA device(s)"), message
