"""What an embedding run logs and how it treats the end of an epoch: the partial last global batch
is skipped by default and counted, and every step logs the numbers that tell learning from collapse
(positive and negative cosine means, in-batch accuracy, per-dim Matryoshka losses)."""

import os
import subprocess
import sys

from tests.training.conftest import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny", "embed_weak.yaml")


def _run(run_dir, data, *overrides):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    done = subprocess.run(
        [sys.executable, "-m", "megatron_conan.training.embed_weak", "--config", TINY, f"run_dir={run_dir}",
         f"data.tokenizer={data['tokenizer']}", f"data.contrastive_prefix={data['pairs']}", "checkpoint.load_dir=null",
         "checkpoint.save_interval=0", "model.soft_mask.backend=sdpa", *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    return read_metrics(run_dir), done.stdout


def test_tail_batches_are_dropped_and_counted_and_every_step_logs_its_cosines(embedding_data, tmp_path):
    # 96 pairs in global batches of 10: 9 full batches an epoch, the last 6 pairs skipped
    metrics, output = _run(tmp_path, embedding_data, "train.train_steps=11", "train.global_batch_size=10",
                           "embedding.matryoshka_dims=[16,32]")
    assert [metrics[step]["samples_per_s"] > 0 for step in range(1, 12)] == [True] * 11
    assert {record["consumed_samples"] for record in metrics.values()} == {10 * step for step in range(1, 12)}
    assert [metrics[step]["dropped_tail_examples"] for step in (9, 10, 11)] == [6, 6, 6]
    assert metrics[8]["dropped_tail_examples"] == 0
    for record in metrics.values():
        for name in ("accuracy", "positive_cosine", "negative_cosine", "loss_dim_16", "loss_dim_32", "loss_dim_64"):
            assert name in record, (name, sorted(record))
        assert -1.0 <= record["negative_cosine"] <= 1.0 and -1.0 <= record["positive_cosine"] <= 1.0
        # the loss is the sum over the dims (weights 1)
        assert abs(record["loss"] - sum(record[f"loss_dim_{d}"] for d in (16, 32, 64))) < 1e-4
