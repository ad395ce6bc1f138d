"""DHNM state: eq. 6 at its boundaries, replacement order through the loader, exhaustion, masked
slots, DP=2 over gloo equal to DP=1, and checkpoints re-sharded across DP sizes."""

import json

import numpy
import pytest
import torch

from megatron_conan.config.run import DHNMConfig
from megatron_conan.data.contrastive import ContrastiveLoader
from megatron_conan.data.dhnm import DHNMState
from megatron_conan.errors import CheckpointMismatchError, ConfigError
from megatron_conan.preprocess.contrastive_tokenize import tokenize_contrastive
from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig
from megatron_conan.testing.distributed import run_distributed

f32 = numpy.float32


def below(value):
    return float(numpy.nextafter(f32(value), f32(-1)))


def above(value):
    return float(numpy.nextafter(f32(value), f32(2)))


def _observe_one(state, example_id, scores, mask=None):
    positions = state.positions[example_id // state.dp_size].astype(numpy.int64)
    mask = numpy.ones(len(scores), bool) if mask is None else numpy.asarray(mask)
    return state.observe([example_id], positions[None], numpy.asarray([scores], f32), mask[None])


# (S_0, S_i, replaced?) with the default thresholds 0.4 / 1.2 / 0.7, decided by hand
BOUNDARIES = [
    # S_0 < 0.4: equal is kept, just below is replaced (whatever S_i is)
    (0.4, 0.4, False), (below(0.4), below(0.4), True), (above(0.4), above(0.4), False),
    (below(0.4), 0.95, True),
    # 1.2 * S_i < S_0: float32(1.2) * 0.5 == float32(0.6) exactly
    (0.6, 0.5, False), (0.6, below(0.5), True), (0.6, above(0.5), False),
    (above(0.6), 0.5, True), (below(0.6), 0.5, False),
    # ... and S_i < 0.7: S_0 = 0.9 makes the ratio hold around 0.7
    (0.9, 0.7, False), (0.9, below(0.7), True), (0.9, above(0.7), False),
    # high and steady: kept
    (0.8, 0.8, False), (0.5, 0.45, False),
]


@pytest.mark.parametrize("first, current, replaced", BOUNDARIES)
def test_eq6_decisions_at_every_boundary(first, current, replaced):
    state = DHNMState([10], 1)
    stats = _observe_one(state, 0, [first])  # the first use records S_0 (and applies eq. 6)
    first_use_replaced = f32(first) < f32(0.4)
    assert stats.replacements == int(first_use_replaced)
    if first_use_replaced:  # replaced at once: the new candidate has no S_0 until its first use
        assert replaced and state.positions[0, 0] == 1 and numpy.isnan(state.first_scores[0, 0])
        return
    assert state.first_scores[0, 0] == f32(first)
    stats = _observe_one(state, 0, [current])
    assert stats.replacements == int(replaced)
    assert state.positions[0, 0] == (1 if replaced else 0)
    assert numpy.isnan(state.first_scores[0, 0]) == replaced  # a new candidate has no S_0 yet
    assert stats.mean_score == pytest.approx(float(f32(current)))


def test_thresholds_are_configurable():
    config = DHNMConfig(min_first_score=0.2, drop_ratio=1.5, max_score=0.9)
    state = DHNMState([10, 10], 1, config)
    _observe_one(state, 0, [0.3])  # kept: 0.3 >= 0.2
    assert _observe_one(state, 0, [0.2]).replacements == 0  # 1.5 * 0.2 == 0.3: not below
    assert _observe_one(state, 1, [0.3]).replacements == 0
    assert _observe_one(state, 1, [below(0.2)]).replacements == 1
    with pytest.raises(ConfigError, match="embedding.dhnm.drop_ratio"):
        DHNMConfig(drop_ratio=0)
    with pytest.raises(ConfigError, match="num_negatives must be >= 1"):
        DHNMState([10], 0)


def test_masked_slots_never_change_the_state():
    state = DHNMState([9, 9], 3)
    _observe_one(state, 0, [0.5, 0.6, 0.7])
    before = state.state_dict()
    for scores in ([0.0, 0.0, 0.0], [float("nan")] * 3, [-1.0, 5.0, 0.1]):
        stats = _observe_one(state, 0, scores, mask=[False, False, False])
        assert stats.replacements == 0 and stats.scored_slots == 0
        _observe_one(state, 1, scores, mask=[False, False, False])  # never seen: stays unseen
    after = state.state_dict()
    for key in ("example_ids", "positions", "first_scores", "cursor", "exhausted"):
        numpy.testing.assert_array_equal(before[key], after[key])
    assert not state.seen[1]
    _observe_one(state, 0, [0.5, 0.1, 0.7], mask=[True, False, True])  # slot 1 masked: kept
    assert state.positions[0].tolist() == [0, 1, 2]


@pytest.fixture(scope="module")
def pool_store(tmp_path_factory, tokenizer_model):
    """Retrieval examples whose pools are 2 negatives + 3 candidates (example 3: 1 negative)."""
    directory = tmp_path_factory.mktemp("dhnm")
    rows = []
    for index in range(4):
        negatives = [f"negative {index}.{j} of the pool" for j in range(2 if index != 3 else 1)]
        candidates = [f"candidate {index}.{j} of the pool" for j in range(3 if index != 3 else 0)]
        rows.append({"task": "retrieval", "query": f"question {index}",
                     "positive": f"answer {index}", "negatives": negatives,
                     "candidates": candidates})
    source = directory / "pools.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prefix = str(directory / "store")
    tokenize_contrastive(PreprocessConfig([str(source)], prefix, tokenizer_model, progress=False))
    return prefix


def test_replacement_is_the_next_unused_candidate_the_next_time_drawn(pool_store, tokenizer):
    loader = ContrastiveLoader(pool_store, tokenizer, batch_size=4, num_negatives=2, seed=3)
    state = DHNMState(loader.store.pool_sizes(), 2)
    loader.negative_picker = state
    batches = iter(loader)

    def draw():
        batch = next(batches)
        assert sorted(batch.example_ids.tolist()) == [0, 1, 2, 3]  # every example, every step
        return batch, {e: row for row, e in enumerate(batch.example_ids.tolist())}

    def observe(batch, scores_by_example):
        scores = torch.tensor([scores_by_example[e] for e in batch.example_ids.tolist()])
        return state.observe(batch.example_ids, batch.negative_pool_positions, scores,
                             batch.negative_mask)

    batch, row = draw()
    assert batch.negative_pool_positions[row[0]].tolist() == [0, 1]
    assert batch.negative_pool_positions[row[3]].tolist() == [0, -1]  # one negative: masked
    stats = observe(batch, {0: [0.3, 0.8], 1: [0.8, 0.8], 2: [0.1, 0.2], 3: [0.1, 0.0]})
    assert stats.replacements == 3 and stats.exhausted_now == 1  # example 3 has nothing left
    assert stats.mean_score == pytest.approx(numpy.mean([0.3, 0.8, 0.8, 0.8, 0.1, 0.2, 0.1]))
    assert stats.exhausted_share == pytest.approx(1 / 4)
    batch, row = draw()
    assert batch.negative_pool_positions[row[0]].tolist() == [2, 1]  # the next unused: 2
    assert batch.negative_pool_positions[row[1]].tolist() == [0, 1]
    assert batch.negative_pool_positions[row[2]].tolist() == [2, 3]  # slot order: 2 then 3
    assert batch.negative_pool_positions[row[3]].tolist() == [0, -1]  # kept the last one
    pool = loader.store.pool(0)
    flat = row[0] * 2
    assert batch.negative_ids[flat, :int(batch.negative_lengths[flat]) - 1].tolist() == (
        pool[2].tolist())
    # slot 1 of example 0 fell from 0.8 to 0.6 (1.2 * 0.6 < 0.8, 0.6 < 0.7): replaced by 3
    stats = observe(batch, {0: [0.9, 0.6], 1: [0.8, 0.8], 2: [0.5, 0.5], 3: [0.1, 0.0]})
    assert stats.replacements == 1 and stats.exhausted_now == 1
    batch, row = draw()
    assert batch.negative_pool_positions[row[0]].tolist() == [2, 3]
    assert state.first_scores[0].tolist() == [pytest.approx(0.9), pytest.approx(numpy.nan,
                                                                                 nan_ok=True)]
    stats = observe(batch, {0: [0.2, 0.1], 1: [0.8, 0.8], 2: [0.5, 0.5], 3: [0.1, 0.0]})
    # 0.2 >= 0.9/1.2 fails the ratio: replaced (0.2 * 1.2 < 0.9, < 0.7); 0.1 < 0.4 first use
    assert stats.replacements == 1 and stats.exhausted_now == 2
    assert state.positions[0].tolist() == [4, 3] and state.exhausted[0]
    assert stats.exhausted_share == pytest.approx(2 / 4)
    # a stale batch (built before the last observe) is refused
    with pytest.raises(RuntimeError, match="not the ones in use"):
        observe(batch, {0: [0.5, 0.5], 1: [0.8, 0.8], 2: [0.5, 0.5], 3: [0.1, 0.0]})


def _observation_steps(num_examples=40, k=3, steps=12, global_batch=7, seed=0):
    """A fixed sequence of (global ids, scores [G, K], masks [G, K]); positions come from the
    state under test, as the loader's would."""
    rng = numpy.random.default_rng(seed)
    plan = []
    for _ in range(steps):
        ids = rng.choice(num_examples, size=global_batch, replace=False)
        scores = rng.choice(f32([0.1, 0.35, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9]),
                            size=(global_batch, k))
        masks = rng.random((global_batch, k)) < 0.85
        plan.append((ids, scores, masks))
    pool_sizes = rng.integers(0, 9, size=num_examples)
    return pool_sizes, plan


def _run_steps(state, plan, rank, world):
    stats = []
    for ids, scores, masks in plan:
        state.exchange(ids)
        mine = numpy.array_split(numpy.arange(len(ids)), world)[rank]
        positions = numpy.full((len(mine), state.num_negatives), -1, dtype=numpy.int64)
        for row, index in enumerate(mine):
            picked = state(int(ids[index]), None)
            positions[row, :len(picked)] = picked
        valid = masks[mine] & (positions >= 0)
        stats.append(state.observe(ids[mine], positions, scores[mine], valid))
    return stats


def _merged(states_dicts):
    """Global {example id: (positions, S_0, cursor, exhausted)} from per-rank state dicts."""
    merged = {}
    for state in states_dicts:
        for i, example_id in enumerate(state["example_ids"].tolist()):
            merged[example_id] = (state["positions"][i].tolist(),
                                  numpy.nan_to_num(state["first_scores"][i], nan=-9).tolist(),
                                  int(state["cursor"][i]), bool(state["exhausted"][i]))
    return merged


def _dp_body(rank, world, directory):
    pool_sizes, plan = _observation_steps()
    state = DHNMState(pool_sizes, 3, dp_rank=rank, dp_size=world,
                      placement=torch.device("cpu"))
    stats = _run_steps(state, plan, rank, world)
    state.save(directory)
    return {"stats": [vars(step) for step in stats], "state": state.state_dict(),
            "owned_rows": len(state.positions)}


def test_dp2_makes_the_same_decisions_as_dp1_and_checkpoints_reshard(tmp_path):
    pool_sizes, plan = _observation_steps()
    single = DHNMState(pool_sizes, 3)
    single_stats = [vars(step) for step in _run_steps(single, plan, 0, 1)]
    assert sum(step["replacements"] for step in single_stats) > 5  # the plan exercises eq. 6
    assert sum(step["exhausted_now"] for step in single_stats) > 0
    results = run_distributed(_dp_body, world_size=2, args=(str(tmp_path),))
    for result in results:
        assert [json.dumps(s, sort_keys=True) for s in result["stats"]] == [
            json.dumps(s, sort_keys=True) for s in single_stats]
        assert result["owned_rows"] == 20  # the state is split over the DP ranks
    reference = _merged([single.state_dict()])
    assert _merged([result["state"] for result in results]) == reference
    assert sorted(p.name for p in (tmp_path / "dhnm").iterdir()) == [
        "shard_00000_of_00002.npz", "shard_00001_of_00002.npz"]
    for world in (1, 4):  # load the DP=2 checkpoint under DP=1 and DP=4
        states = [DHNMState(pool_sizes, 3, dp_rank=rank, dp_size=world)
                  for rank in range(world)]
        for state in states:
            state.load(str(tmp_path))
        assert _merged([state.state_dict() for state in states]) == reference
        # and the loaded state makes the next decisions like the uninterrupted one
        for example_id in range(len(pool_sizes)):
            owner = states[example_id % world]
            assert owner.positions[example_id // world].tolist() == single.positions[
                example_id].tolist()
            assert owner.cursor[example_id // world] == single.cursor[example_id]


def test_checkpoint_mismatches_are_refused(tmp_path):
    state = DHNMState([5, 5, 5], 2, dp_rank=1, dp_size=2)
    state.save(str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match="ranks \\[0\\] of 2 are missing"):
        DHNMState([5, 5, 5], 2).load(str(tmp_path))
    DHNMState([5, 5, 5], 2, dp_rank=0, dp_size=2).save(str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match="num_negatives=2, this run has 3"):
        DHNMState([5, 5, 5], 3).load(str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match="num_examples=3, this run has 4"):
        DHNMState([5, 5, 5, 5], 2).load(str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match="load the checkpoint.s shards with load"):
        DHNMState([5, 5, 5], 2).load_state_dict(state.state_dict())
    with pytest.raises(CheckpointMismatchError, match="expected the DHNM shards of one DP size"):
        DHNMState([5, 5, 5], 2).load(str(tmp_path / "nowhere"))
    assert DHNMState([5, 5, 5], 2, dp_rank=0, dp_size=2).save(
        str(tmp_path / "other"), writer=False) is None
    assert not (tmp_path / "other").exists()
