import itertools
import json
import math

import numpy
import pytest
import torch

from megatron_conan.data import synthetic
from megatron_conan.data.contrastive import (
    ContrastiveBatch, ContrastiveLoader, ContrastiveStore, tokenize_contrastive)
from megatron_conan.data.encoders import CONTRASTIVE_TASKS, format_instruction
from megatron_conan.data.jsonl import BadLineKind, StrictModeError
from megatron_conan.data.preprocess import PreprocessConfig
from megatron_conan.data.tokenizer import ConanTokenizer, TokenizerTrainingConfig, train_tokenizer

PER_TASK = 11


@pytest.fixture(scope="module")
def jsonl_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("contrastive") / "mixed.jsonl"
    synthetic.write_contrastive_jsonl(str(path), examples_per_task=PER_TASK, seed=1)
    return path


@pytest.fixture(scope="module")
def store_prefix(jsonl_path, tokenizer_model):
    prefix = str(jsonl_path.parent / "store")
    result = tokenize_contrastive(PreprocessConfig([str(jsonl_path)], prefix, tokenizer_model,
                                                   progress=False, workers=2, batch_lines=7))
    assert result.bad_lines.total == 0
    return prefix


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_round_trip_for_every_task(jsonl_path, store_prefix, tokenizer):
    store = ContrastiveStore(store_prefix)
    rows = _rows(jsonl_path)
    assert len(store) == len(rows)
    assert store.meta["examples_per_task"] == {task: PER_TASK for task in CONTRASTIVE_TASKS}
    enc = tokenizer.encode
    for example_id, row in enumerate(rows):
        example = store.example(example_id)
        assert example.task == row["task"] == store.task_of(example_id)
        anchor, positive = {"pair": ("query", "positive"), "retrieval": ("query", "positive"),
                            "clr": ("query", "positive"), "classification": ("text", "label"),
                            "sts": ("text1", "text2")}[row["task"]]
        assert example.anchor.tolist() == enc(row[anchor])
        assert example.positive.tolist() == enc(row[positive])
        negatives = row.get("negative_labels", row.get("negatives", []))
        assert [n.tolist() for n in example.negatives] == [enc(text) for text in negatives]
        assert [c.tolist() for c in example.candidates] == [enc(text) for text in
                                                            row.get("candidates", [])]
        assert [p.tolist() for p in store.pool(example_id)] == [
            enc(text) for text in negatives + row.get("candidates", [])]
        assert example.language == row.get("language")
        if row["task"] == "sts":
            assert math.isclose(example.score, row["score"], rel_tol=1e-6)
        else:
            assert example.score is None
        instruction = row.get("instruction")
        assert (None if example.instruction is None else example.instruction.tolist()) == (
            None if instruction is None else enc(format_instruction(instruction)))


def _loader(prefix, tokenizer, rank=0, world=1, **options):
    options.setdefault("batch_size", {"pair": 3, "retrieval": 2, "clr": 2, "classification": 4,
                                      "sts": 5})
    return ContrastiveLoader(prefix, tokenizer, dp_rank=rank, dp_world_size=world, seed=7,
                             **options)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dp_shards_cover_each_example_once_per_epoch(store_prefix, tokenizer, world):
    loaders = [_loader(store_prefix, tokenizer, rank, world) for rank in range(world)]
    steps = loaders[0].steps_per_epoch
    seen = []
    for epoch in range(2):
        epoch_ids = []
        for step in range(steps):
            batches = [next(iter(loader)) for loader in loaders]
            assert len({batch.task for batch in batches}) == 1  # all ranks on one task per step
            assert all(set(batch.example_ids.tolist()) <= set(
                loader.store.example_ids_of_task(batch.task).tolist())
                for batch, loader in zip(batches, loaders))
            for batch in batches:
                epoch_ids.extend(batch.example_ids.tolist())
        assert sorted(epoch_ids) == list(range(5 * PER_TASK))  # exactly once per epoch
        seen.append(epoch_ids)
    assert seen[0] != seen[1]  # reshuffled each epoch
    assert all(loader.state_dict()["epoch"] == 2 for loader in loaders)


def test_drop_last_gives_full_batches_without_repeats(store_prefix, tokenizer):
    loaders = [_loader(store_prefix, tokenizer, rank, 2, drop_last=True) for rank in range(2)]
    ids = []
    for _ in range(loaders[0].steps_per_epoch):
        for loader in loaders:
            batch = next(iter(loader))
            assert batch.size == loader.batch_sizes[batch.task]
            ids.extend(batch.example_ids.tolist())
    assert len(ids) == len(set(ids))


def test_resume_continues_with_the_same_next_batch(store_prefix, tokenizer):
    reference = _loader(store_prefix, tokenizer, 1, 2)
    stream = iter(reference)
    for _ in range(reference.steps_per_epoch + 3):  # into the second epoch
        next(stream)
    state = reference.state_dict()
    expected = [next(stream) for _ in range(4)]
    resumed = _loader(store_prefix, tokenizer, 1, 2)
    resumed.load_state_dict(state)
    for want, got in zip(expected, itertools.islice(resumed, 4)):
        assert (want.task, want.epoch, want.step) == (got.task, got.epoch, got.step)
        assert torch.equal(want.example_ids, got.example_ids)
        assert torch.equal(want.query_ids, got.query_ids)
    with pytest.raises(ValueError, match="dp_world_size"):
        _loader(store_prefix, tokenizer, 0, 3).load_state_dict(state)


def _first_batch_of(loader, task):
    return next(batch for batch in loader if batch.task == task and batch.size > 0)


def test_batch_contents(store_prefix, tokenizer):
    instructions = {"retrieval": "Find the answer", "sts": "Same meaning?"}
    loader = _loader(store_prefix, tokenizer, instructions=instructions, num_negatives=3,
                     max_query_length=64, max_passage_length=48)
    store = loader.store
    eod, pad = tokenizer.eod_id, tokenizer.pad_id
    retrieval = _first_batch_of(loader, "retrieval")
    assert isinstance(retrieval, ContrastiveBatch)
    for row, example_id in enumerate(retrieval.example_ids.tolist()):
        example = store.example(example_id)
        prefix = (example.instruction.tolist() if example.instruction is not None
                  else tokenizer.encode(format_instruction(instructions["retrieval"])))
        expected_query = (prefix + example.anchor.tolist())[:63] + [eod]
        length = int(retrieval.query_lengths[row])
        assert retrieval.query_ids[row, :length].tolist() == expected_query
        assert (retrieval.query_ids[row, length:] == pad).all()
        positive_length = int(retrieval.positive_lengths[row])
        assert retrieval.positive_ids[row, :positive_length].tolist() == (
            example.positive.tolist()[:47] + [eod])
        pool = store.pool(example_id)
        for slot in range(3):
            position = int(retrieval.negative_pool_positions[row, slot])
            assert bool(retrieval.negative_mask[row, slot]) == (slot < len(pool))
            if slot < len(pool):
                assert position == slot
                flat = row * 3 + slot
                stored = retrieval.negative_ids[flat, :int(retrieval.negative_lengths[flat])]
                assert stored.tolist() == pool[slot].tolist()[:47] + [eod]
            else:
                assert position == -1
    sts = _first_batch_of(loader, "sts")
    assert sts.scores.shape == sts.example_ids.shape and sts.negative_ids is None
    prefix = tokenizer.encode(format_instruction(instructions["sts"]))
    for row, example_id in enumerate(sts.example_ids.tolist()):
        example = store.example(example_id)
        assert sts.scores[row] == pytest.approx(example.score)
        text2 = sts.positive_ids[row, :int(sts.positive_lengths[row])].tolist()
        assert text2 == (prefix + example.positive.tolist())[:63] + [eod]  # symmetric prefix
    classification = _first_batch_of(loader, "classification")
    most = max(store.example(i).negatives.__len__() for i in classification.example_ids.tolist())
    assert classification.negative_mask.shape == (classification.size, most)
    pair = _first_batch_of(loader, "pair")
    assert pair.negative_ids is None and pair.scores is None
    clr = _first_batch_of(loader, "clr")
    assert all(language in synthetic.LANGUAGES for language in clr.languages)


def test_negative_picker_chooses_pool_entries(store_prefix, tokenizer):
    calls = []

    def pick_last_first(example_id, pool_size):
        calls.append(example_id)
        return list(reversed(range(pool_size)))

    loader = _loader(store_prefix, tokenizer, tasks=["retrieval"], num_negatives=2,
                     negative_picker=pick_last_first)
    batch = next(iter(loader))
    assert calls == batch.example_ids.tolist()
    for row, example_id in enumerate(batch.example_ids.tolist()):
        size = loader.store.pool_size(example_id)
        want = [size - 1 - slot if slot < size else -1 for slot in range(2)]
        assert batch.negative_pool_positions[row].tolist() == want
        assert loader.store.pool_sequence_ids(example_id).shape == (size,)


def test_bad_contrastive_lines_are_counted(tokenizer_model, tmp_path):
    source = tmp_path / "bad.jsonl"
    lines = [
        {"task": "pair", "query": "q", "positive": "p"},
        {"task": "ranking", "query": "q", "positive": "p"},
        {"query": "q", "positive": "p"},
        {"task": "retrieval", "query": "q", "positive": "p", "negatives": "not a list"},
        {"task": "classification", "text": "t", "label": "l"},
        {"task": "classification", "text": "t", "label": "l", "negative_labels": []},
        {"task": "sts", "text1": "a", "text2": "b", "score": "high"},
        {"task": "sts", "text1": "a", "text2": "b"},
        {"task": "retrieval", "query": "q", "positive": "", "negatives": []},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = tokenize_contrastive(PreprocessConfig([str(source)], str(tmp_path / "s"),
                                                   tokenizer_model, progress=False))
    assert result.documents == 1
    counts = {kind: result.bad_lines.count(kind) for kind in BadLineKind}
    assert counts[BadLineKind.INVALID_VALUE] == 1
    assert counts[BadLineKind.MISSING_FIELD] == 3
    assert counts[BadLineKind.NON_STRING_FIELD] == 2
    assert counts[BadLineKind.EMPTY_TEXT] == 2
    assert result.bad_lines.examples[BadLineKind.INVALID_VALUE][0].line_number == 2
    with pytest.raises(StrictModeError):
        tokenize_contrastive(PreprocessConfig([str(source)], str(tmp_path / "strict"),
                                              tokenizer_model, progress=False, strict=True))
    assert not list(tmp_path.glob("strict*"))


def test_tool_and_tokenizer_mismatch(jsonl_path, tokenizer_model, corpus_dir, tmp_path, scripts):
    tool = scripts("tools/tokenize_contrastive.py")
    assert tool.main(["--input", str(jsonl_path), "--output-prefix", str(tmp_path / "s"),
                      "--tokenizer-model", tokenizer_model, "--no-progress"]) == 0
    assert len(ContrastiveStore(str(tmp_path / "s"))) == 5 * PER_TASK
    other = tmp_path / "other"
    train_tokenizer([str(corpus_dir / "mixed.jsonl")], str(other),
                    TokenizerTrainingConfig(vocab_size=900, num_threads=1))
    with pytest.raises(ValueError, match="another tokenizer"):
        ContrastiveLoader(str(tmp_path / "s"), ConanTokenizer(str(other) + ".model"), 4)


def test_incomplete_store_is_refused(store_prefix, tmp_path):
    import shutil

    for suffix in (".bin", ".idx", ".examples.npy"):
        shutil.copy(store_prefix + suffix, tmp_path / f"partial{suffix}")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ContrastiveStore(str(tmp_path / "partial"))
    numpy.testing.assert_array_equal(numpy.load(tmp_path / "partial.examples.npy")["task"],
                                     numpy.load(store_prefix + ".examples.npy")["task"])
