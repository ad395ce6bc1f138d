"""SFT supervises exactly the output tokens; --dry-run plans the 1.4B run without allocating it."""

import torch

from megatron_conan.data.sft import build_sft_example
from megatron_conan.losses.lm import masked_token_mean
from megatron_conan.training.pretrain import main as pretrain_main
from megatron_conan.training.sft import main as sft_main


def test_sft_loss_mask_covers_exactly_the_output_tokens_and_eod():
    prompt, output, eod, pad = [11, 12, 13, 14], [21, 22, 23], 2, 0
    sample = build_sft_example(prompt, output, seq_length=12, pad_id=pad, eod_id=eod)
    labels, mask = sample["labels"].tolist(), sample["loss_mask"].tolist()
    supervised = [label for label, m in zip(labels, mask) if m == 1.0]
    assert supervised == output + [eod]
    # position by position: label i is token i+1; prompt labels (positions 0..2) and padding are off
    assert mask == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert sample["tokens"].tolist()[:7] == prompt + output
    # the loss the SFT step reports is the mean over those positions only
    per_token = torch.arange(12, dtype=torch.float32).unsqueeze(0)
    loss, _ = masked_token_mean(per_token, sample["loss_mask"].unsqueeze(0))
    assert loss.item() == (3 + 4 + 5 + 6) / 4


def test_sft_truncation_keeps_the_mask_on_output_labels_only():
    sample = build_sft_example([5] * 6, [7] * 10, seq_length=8, pad_id=0, eod_id=2)
    assert sample["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert sample["labels"].tolist()[5:] == [7, 7, 7]


def _dry_run(main, capsys, *overrides):
    assert main(["--config", "examples/conan_1p4b/pretrain.yaml" if main is pretrain_main
                 else "examples/conan_1p4b/sft.yaml", "--dry-run", "--world-size", "64", *overrides]) == 0
    return capsys.readouterr().out


def test_dry_run_1p4b_on_64_gpus_both_layouts(capsys, monkeypatch):
    import megatron_conan.models.conan as conan

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run must not build the model")

    monkeypatch.setattr(conan, "build_conan_model", refuse)
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])
    out = _dry_run(pretrain_main, capsys)
    assert "world 64 = TP 1 x PP 1 x DP 64" in out
    assert "tokens per step: 1,048,576 (256 x 4096)" in out
    assert "steps for 3e+12 tokens: 2,861,023" in out
    assert "1,499,262,464 parameters" in out
    out = _dry_run(pretrain_main, capsys, "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2")
    assert "world 64 = TP 2 x PP 2 x DP 16" in out and "gradient-accumulation steps 16" in out
    for category in ("weights", "gradients", "optimizer", "activations", "total"):
        assert category in out
    out = _dry_run(sft_main, capsys)
    assert "global 64 sequences" in out
