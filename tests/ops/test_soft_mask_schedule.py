import pytest
import torch

from megatron_conan.ops.soft_mask_attention.schedule import (
    SoftMaskConfig, SoftMaskSchedule, row_mask_weights, schedule_progress)


@pytest.mark.parametrize("schedule,expected", [
    ("linear", [0.0, 0.25, 0.5, 1.0, 1.0]),
    ("quadratic", [0.0, 0.0625, 0.25, 1.0, 1.0]),
    ("decelerating", [0.0, 0.4375, 0.75, 1.0, 1.0]),
])
def test_schedule_progress(schedule, expected):
    got = [schedule_progress(schedule, t, 100) for t in (0, 25, 50, 100, 150)]
    assert got == pytest.approx(expected)


def test_row_weights_formulas():
    lengths = torch.tensor([4, 2], dtype=torch.int32)
    m = row_mask_weights(0.5, lengths, 4, "len_over_pos")
    # min(1, a * L / (i + 1)); padded rows 0
    assert torch.allclose(m[0], torch.tensor([1.0, 1.0, 2 / 3, 0.5]))
    assert torch.allclose(m[1], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    m = row_mask_weights(0.5, lengths, 4, "pos_over_len")
    assert torch.allclose(m[0], torch.tensor([0.125, 0.25, 0.375, 0.5]))
    assert torch.allclose(m[1], torch.tensor([0.25, 0.5, 0.0, 0.0]))
    m = row_mask_weights(0.3, lengths, 4, "none")
    assert torch.allclose(m[0], torch.full((4,), 0.3))
    assert torch.equal(m[1, 2:], torch.zeros(2))


def test_row_weights_exact_at_ends():
    lengths = torch.tensor([37, 5], dtype=torch.int32)
    valid = torch.arange(37)[None, :] < lengths[:, None]
    for scale in ("len_over_pos", "pos_over_len", "none"):
        assert torch.equal(row_mask_weights(0.0, lengths, 37, scale), torch.zeros(2, 37))
    for scale in ("len_over_pos", "none"):
        assert torch.equal(row_mask_weights(1.0, lengths, 37, scale), valid.float())


@pytest.mark.parametrize("field,value", [
    ("schedule", "cosine"), ("position_scale", "pos"), ("total_steps", 0), ("fixed_a", 1.5),
    ("backend", "flash"), ("deterministic", "yes"),
])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        SoftMaskConfig(**{field: value})


def test_schedule_state_roundtrip():
    config = SoftMaskConfig(schedule="quadratic", total_steps=10)
    sched = SoftMaskSchedule(config)
    sched.set_step(5)
    assert sched.a == pytest.approx(0.25)
    restored = SoftMaskSchedule(SoftMaskConfig(schedule="quadratic", total_steps=10,
                                               backend="reference"))
    restored.load_state_dict(sched.state_dict())
    assert restored.step == 5 and restored.a == pytest.approx(0.25)
    with pytest.raises(ValueError, match="total_steps"):
        SoftMaskSchedule(SoftMaskConfig(schedule="quadratic", total_steps=20)).load_state_dict(sched.state_dict())


def test_fixed_modes():
    assert SoftMaskSchedule(SoftMaskConfig.causal(), step=7).a == 0.0
    assert SoftMaskSchedule(SoftMaskConfig.bidirectional(), step=0).a == 1.0
