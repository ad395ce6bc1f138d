"""Issue 18 item 2: stages 3 and 4, conversion and evaluation keep the weights, every tensor fed to
the model, every batch and every collective on the placement's device (CPU under gloo here, the
rank's indexed GPU under NCCL), recorded through the placement seam."""

import os

import torch

from megatron_conan.testing.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _seen(seen, placement):
    return {"devices": seen.devices(), "kinds": seen.kinds(), "fed": seen.fed, "moved": seen.moved(),
            "device": placement.device}


def _train_recorded(rank, world_size, stage, argv):
    from megatron_conan.distributed.device import current_placement
    from megatron_conan.testing.placement import recording_devices
    from megatron_conan.training.stage_main import parse_run_config
    from megatron_conan.training.trainer import train

    _, cfg = parse_run_config(stage, argv)
    with recording_devices() as seen:
        train(cfg, stage=stage)
    return _seen(seen, current_placement())


def _gather_recorded(rank, world_size):
    """Conversion's collective step: a TP2 model's full weights gathered on every rank."""
    from megatron_conan.checkpoint.standalone import build_model
    from megatron_conan.config.model import ParallelConfig, tiny
    from megatron_conan.distributed.device import current_placement
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.sharding import gather_full_state_dict
    from megatron_conan.testing.placement import recording_devices

    initialize_model_parallel(ParallelConfig(tensor_parallel=2))
    chunks = build_model(tiny(), parallel=ParallelConfig(tensor_parallel=2))
    with recording_devices() as seen:
        full = gather_full_state_dict(chunks, tiny())
    weights = {parameter.device for chunk in chunks for parameter in chunk.parameters()}
    result = _seen(seen, current_placement())
    result["devices"] |= weights
    result["gathered"] = len(full)
    return result


def _encode_recorded(rank, world_size, checkpoint):
    from megatron_conan.distributed.device import current_placement
    from megatron_conan.eval.embedders import CheckpointEmbedder
    from megatron_conan.testing.placement import recording_devices

    with recording_devices() as seen, CheckpointEmbedder(checkpoint) as embedder:
        vectors = embedder.encode(["first text", "a second, longer text"], batch_size=1)
        model_device = embedder.device
    result = _seen(seen, current_placement())
    result["devices"].add(model_device)
    result["shape"] = vectors.shape
    return result


def _assert_one_device(results, kinds):
    for result in results:
        assert result["devices"] == {result["device"]}, result["devices"]
        assert set(kinds) <= result["kinds"], result["kinds"]
        for pointers in result.get("fed", []):
            assert pointers[0] in result["moved"], "input_ids reached the model without passing the seam"


def _embedding_argv(config, run_dir, tokenizer, data, *extra):
    return ["--config", os.path.join(REPO, "examples", "tiny", config), f"run_dir={run_dir}",
            f"data.tokenizer={tokenizer}", f"data.contrastive_prefix={data}", "checkpoint.load_dir=null",
            # right-padded batches: the seam check follows the batch's own input_ids tensor to the
            # model (packed rows are new tensors pack_batch builds on that tensor's device)
            "embedding.packing=false",
            "train.train_steps=2", "train.global_batch_size=8", *extra]


def test_stage3_then_evaluation_stay_on_one_device(embedding_data, tmp_path):
    argv = _embedding_argv("embed_weak.yaml", tmp_path / "weak", embedding_data["tokenizer"], embedding_data["pairs"],
                           "checkpoint.save_interval=2")
    results = run_distributed(_train_recorded, 2, args=("embed-weak", argv))
    _assert_one_device(results, {"batch", "all_reduce", "all_gather"})  # gathered InfoNCE
    assert all(result["fed"] for result in results)
    (evaluated,) = run_distributed(_encode_recorded, 1, args=(str(tmp_path / "weak" / "checkpoints"),))
    _assert_one_device([evaluated], {"batch"})
    assert evaluated["shape"][0] == 2


def test_stage4_stays_on_one_device(embedding_data, supervised_store, tmp_path):
    argv = _embedding_argv("embed_sup.yaml", tmp_path / "sup", embedding_data["tokenizer"], supervised_store,
                           "checkpoint.save_interval=0",
                           "embedding.dhnm={enabled: true, min_first_score: 0.95, drop_ratio: 1.2, max_score: 0.7}")
    results = run_distributed(_train_recorded, 2, args=("embed-sup", argv))
    _assert_one_device(results, {"batch", "all_reduce", "all_gather"})


def test_conversion_gather_stays_on_one_device():
    results = run_distributed(_gather_recorded, 2)
    _assert_one_device(results, {"all_gather"})
    assert results[0]["gathered"] > 0 and results[0]["device"] == torch.device("cpu")
