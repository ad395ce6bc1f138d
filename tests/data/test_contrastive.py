import itertools
import json
import math

import numpy
import pytest
import torch

from megatron_conan.cli import tokenize_contrastive as tokenize_contrastive_command
from megatron_conan.data.contrastive import PAPER_TASK_WEIGHTS, ContrastiveBatch, ContrastiveLoader, ContrastiveStore
from megatron_conan.data.jsonl import BadLineKind, StrictModeError
from megatron_conan.data.tokenizer import ConanTokenizer, TokenizerTrainingConfig, train_tokenizer
from megatron_conan.datagen import synthetic
from megatron_conan.errors import CheckpointMismatchError, ConfigError, DataError
from megatron_conan.preprocess.contrastive_tokenize import tokenize_contrastive
from megatron_conan.tasks import TASK_NAMES, format_instruction, format_query
from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig

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
    assert store.meta["examples_per_task"] == {task: PER_TASK for task in TASK_NAMES}
    enc = tokenizer.encode
    for example_id, row in enumerate(rows):
        example = store.example(example_id)
        assert example.task == row["task"] == store.task_of(example_id)
        anchor, positive = {"pair": ("query", "positive"), "retrieval": ("query", "positive"),
                            "clr": ("query", "positive"), "classification": ("text", "label"),
                            "sts": ("text1", "text2")}[row["task"]]
        instruction = row.get("instruction")
        assert example.instructed == (instruction is not None)
        query = row[anchor] if instruction is None else format_query(instruction, row[anchor])
        assert example.anchor.tolist() == enc(query)
        # the prompt's tokens counted alone, as sentence-transformers counts them (a prompt ending in a
        # space may tokenize differently before a text, so this is a count, not a prefix match)
        prompt_length = 0 if instruction is None else len(enc(format_instruction(instruction)))
        assert example.prompt_length == prompt_length
        assert example.positive.tolist() == enc(row[positive])
        assert store.location(example_id).endswith(f"mixed.jsonl:{example_id + 1}")
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


BATCH_SIZES = {"pair": 3, "retrieval": 2, "clr": 2, "classification": 4, "sts": 5}


def _loader(prefix, tokenizer, rank=0, world=1, **options):
    options.setdefault("batch_size", BATCH_SIZES)
    options.setdefault("task_weights", "size")
    return ContrastiveLoader(prefix, tokenizer, dp_rank=rank, dp_world_size=world, seed=7,
                             **options)


def _draws(loader, steps):
    """(task, task epoch, global example ids) of the next `steps` global batches (no tokens)."""
    return [loader.plan.next() for _ in range(steps)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dp_shards_cover_each_example_once_per_task_epoch(store_prefix, tokenizer, world):
    loaders = [_loader(store_prefix, tokenizer, rank, world) for rank in range(world)]
    streams = [iter(loader) for loader in loaders]
    per_epoch = {}  # (task, epoch) -> ids drawn, over all ranks
    for step in range(40):
        batches = [next(stream) for stream in streams]
        assert len({(batch.task, batch.epoch, batch.step) for batch in batches}) == 1
        assert batches[0].step == step
        sizes = [batch.size for batch in batches]
        assert max(sizes) - min(sizes) <= 1  # near-equal slices of one global batch
        for batch in batches:
            per_epoch.setdefault((batch.task, batch.epoch), []).extend(batch.example_ids.tolist())
    store = loaders[0].store
    for (task, epoch), ids in per_epoch.items():
        everything = sorted(store.example_ids_of_task(task).tolist())
        if (task, epoch + 1) in per_epoch:  # a finished task epoch: every example exactly once
            assert sorted(ids) == everything
        else:
            assert len(ids) == len(set(ids)) and set(ids) <= set(everything)
    again = [task for task, epoch in per_epoch if epoch == 1 and len(per_epoch[task, 1]) >= 4]
    assert len(again) >= 3
    for task in again:  # each task epoch is a new permutation
        assert per_epoch[task, 0][:4] != per_epoch[task, 1][:4]


def test_drop_last_gives_full_batches_without_repeats(store_prefix, tokenizer):
    loaders = [_loader(store_prefix, tokenizer, rank, 2, drop_last=True) for rank in range(2)]
    streams = [iter(loader) for loader in loaders]
    seen = {}
    for _ in range(30):
        for loader, stream in zip(loaders, streams):
            batch = next(stream)
            assert batch.size == loader.batch_sizes[batch.task]
            ids = seen.setdefault((batch.task, batch.epoch), [])
            ids.extend(batch.example_ids.tolist())
            assert len(ids) == len(set(ids))
    with pytest.raises(ConfigError, match="fewer examples than one global batch"):
        _loader(store_prefix, tokenizer, 0, 2, drop_last=True, batch_size=6)


def test_global_batches_depend_on_the_global_batch_size_only(store_prefix, tokenizer):
    """DP=1 with batch b*k and DP=k with batch b: the same global batches in the same order."""
    single = _loader(store_prefix, tokenizer, 0, 1,
                     batch_size={task: 2 * size for task, size in BATCH_SIZES.items()})
    pair = [_loader(store_prefix, tokenizer, rank, 2) for rank in range(2)]
    streams = [iter(loader) for loader in pair]
    for want in itertools.islice(single, 25):
        got = [next(stream) for stream in streams]
        assert all(batch.task == want.task and batch.step == want.step for batch in got)
        assert torch.cat([batch.example_ids for batch in got]).tolist() == want.example_ids.tolist()
        for batch, rows in zip(got, (slice(0, got[0].size), slice(got[0].size, None))):
            width = batch.query_ids.shape[1]
            assert torch.equal(batch.query_ids, want.query_ids[rows, :width])
            assert torch.equal(batch.query_lengths, want.query_lengths[rows])


def test_task_draw_follows_the_weights(store_prefix, tokenizer):
    loader = _loader(store_prefix, tokenizer, task_weights=None, tasks=[
        "retrieval", "clr", "classification", "sts"])
    total = sum(PAPER_TASK_WEIGHTS.values())
    assert loader.task_probabilities == pytest.approx(
        {task: weight / total for task, weight in PAPER_TASK_WEIGHTS.items()})
    steps = 4000
    counts = {task: 0 for task in loader.tasks}
    for task, _, _, ids in _draws(loader, steps):
        counts[task] += 1
        size = loader.batch_sizes[task]  # per-task batch sizes; a task epoch's last one partial
        assert len(ids) in (size, PER_TASK % size)
    for task, probability in loader.task_probabilities.items():
        bound = 5 * math.sqrt(steps * probability * (1 - probability))  # 5 sigma: never flaky
        assert abs(counts[task] - steps * probability) < bound, (task, counts)
    # equal weights although the sizes differ; a weight of 0 leaves a task out
    skewed = _loader(store_prefix, tokenizer, task_weights={"pair": 1, "retrieval": 3, "clr": 0,
                                                            "classification": 0, "sts": 0})
    assert skewed.tasks == ["pair", "retrieval"]
    draws = [task for task, _, _, _ in _draws(skewed, 2000)]
    assert abs(draws.count("retrieval") - 1500) < 5 * math.sqrt(2000 * 0.75 * 0.25)
    # the draw is a function of (seed, step): the same on every rank
    ranks = [_loader(store_prefix, tokenizer, rank, 3) for rank in range(3)]
    sequences = [[task for task, _, _, _ in _draws(rank_loader, 100)] for rank_loader in ranks]
    assert sequences[0] == sequences[1] == sequences[2]


def test_bad_task_weights_are_named(store_prefix, tokenizer):
    with pytest.raises(ConfigError, match="unknown tasks \\['retreival'\\]"):
        _loader(store_prefix, tokenizer, task_weights={"retreival": 1.0, "sts": 1.0})
    with pytest.raises(ConfigError, match="no value for tasks \\['pair'\\]"):
        _loader(store_prefix, tokenizer, task_weights=None)  # pair is not in the paper mix
    with pytest.raises(ConfigError, match="finite"):
        _loader(store_prefix, tokenizer, task_weights={task: float("nan") for task in
                                                       TASK_NAMES})
    with pytest.raises(ConfigError, match="batch sizes give no value for tasks \\['sts'\\]"):
        _loader(store_prefix, tokenizer, batch_size={"pair": 1, "retrieval": 1, "clr": 1,
                                                     "classification": 1})


def test_resume_continues_with_the_same_next_batch(store_prefix, tokenizer):
    reference = _loader(store_prefix, tokenizer, 1, 2)
    stream = iter(reference)
    for _ in range(23):  # several task epochs in, mid-epoch for most tasks
        next(stream)
    state = reference.state_dict()
    assert state["step"] == 23 and set(state["tasks"]) == set(TASK_NAMES)
    expected = [next(stream) for _ in range(6)]
    resumed = _loader(store_prefix, tokenizer, 1, 2)
    resumed.load_state_dict(state)
    for want, got in zip(expected, itertools.islice(resumed, 6)):
        assert (want.task, want.epoch, want.step) == (got.task, got.epoch, got.step)
        assert torch.equal(want.example_ids, got.example_ids)
        assert torch.equal(want.query_ids, got.query_ids)
    # DP=1 with the same global batch continues the same global batches (rank 1's half inside)
    single = _loader(store_prefix, tokenizer, 0, 1,
                     batch_size={task: 2 * size for task, size in BATCH_SIZES.items()})
    single.load_state_dict(state)
    for want, got in zip(expected, itertools.islice(single, 6)):
        assert (want.task, want.epoch, want.step) == (got.task, got.epoch, got.step)
        assert numpy.array_split(got.example_ids.numpy(), 2)[1].tolist() == (
            want.example_ids.tolist())
    with pytest.raises(CheckpointMismatchError, match="global_batch_sizes"):
        _loader(store_prefix, tokenizer, 0, 3).load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match="task probabilities"):
        _loader(store_prefix, tokenizer, 1, 2, task_weights={
            task: position + 1 for position, task in enumerate(TASK_NAMES)}
        ).load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match="older loader"):
        _loader(store_prefix, tokenizer, 1, 2).load_state_dict(
            {"epoch": 0, "step": 3, "seed": 7, "dp_world_size": 2, "steps_per_epoch": 30})


def _first_batch_of(loader, task):
    return next(batch for batch in loader if batch.task == task and batch.size > 0)


def test_batch_contents(store_prefix, tokenizer):
    loader = _loader(store_prefix, tokenizer, num_negatives=3, max_query_length=64,
                     max_passage_length=48)
    store = loader.store
    eod, pad = tokenizer.eod_id, tokenizer.pad_id
    retrieval = _first_batch_of(loader, "retrieval")
    assert isinstance(retrieval, ContrastiveBatch)
    for row, example_id in enumerate(retrieval.example_ids.tolist()):
        example = store.example(example_id)
        expected_query = example.anchor.tolist()[:63] + [eod]
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
            flat = row * 3 + slot
            stored = retrieval.negative_ids[flat, :int(retrieval.negative_lengths[flat])]
            if slot < len(pool):
                assert position == slot
                assert stored.tolist() == pool[slot].tolist()[:47] + [eod]
            else:
                assert position == -1 and stored.tolist() == [eod]  # masked, not a duplicate
    sts = _first_batch_of(loader, "sts")
    assert sts.scores.shape == sts.example_ids.shape and sts.negative_ids is None
    for row, example_id in enumerate(sts.example_ids.tolist()):
        example = store.example(example_id)
        assert sts.scores[row] == pytest.approx(example.score)
        text2 = sts.positive_ids[row, :int(sts.positive_lengths[row])].tolist()
        assert text2 == example.positive.tolist()[:63] + [eod]  # the query limit: both are queries
    classification = _first_batch_of(loader, "classification")
    most = max(store.example(i).negatives.__len__() for i in classification.example_ids.tolist())
    assert classification.negative_mask.shape == (classification.size, most)
    pair = _first_batch_of(loader, "pair")
    assert pair.negative_ids is None and pair.scores is None
    clr = _first_batch_of(loader, "clr")
    assert all(language in synthetic.LANGUAGES for language in clr.languages)


MULTILINGUAL = [
    ("retrieval", "How does the for statement iterate over a sequence?"),
    ("retrieval", "Wie iteriert die for-Anweisung über eine Sequenz?"),
    ("clr", "for 语句如何遍历序列？"),
    ("clr", "Как оператор for перебирает последовательность?"),
    ("pair", "¿Qué hace la sentencia with en Python?"),
    ("classification", "L'instruction try intercepte les exceptions levées."),
    ("retrieval", "for文はシーケンスをどのように反復しますか？"),
]


@pytest.fixture(scope="module")
def instructed_store(tmp_path_factory, tokenizer_model):
    directory = tmp_path_factory.mktemp("instructed")
    rows = []
    for index, (task, text) in enumerate(MULTILINGUAL):
        row = {"task": task}
        if task == "classification":
            row.update(text=text, label="errors", negative_labels=["loops", "files"])
        else:
            row.update(query=text, positive=f"The {task} passage number {index}.")
        if index % 3 == 2:
            row["instruction"] = "Trouvez le passage qui répond à la question"  # its own
        rows.append(row)
    rows.append({"task": "sts", "text1": "Die Schleife endet.", "text2": "循环结束了。",
                 "score": 3.5})
    source = directory / "instructed.jsonl"
    source.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                      encoding="utf-8")
    instructions = {"retrieval": "Given a question, retrieve passages that answer it",
                    "clr": "Given a question, retrieve passages in any language",
                    "classification": "Classify the topic of the sentence",
                    "sts": "Retrieve semantically similar text"}
    prefix = str(directory / "store")
    tokenize_contrastive(PreprocessConfig([str(source)], prefix, tokenizer_model, progress=False,
                                          instructions=instructions))
    return prefix, rows, instructions


def test_instructed_queries_tokenize_as_one_string(instructed_store, tokenizer):
    """The ids the model trains on are those of the whole prompt string, as a
    sentence-transformers prompt tokenizes at inference, not prompt ids + text ids."""
    prefix, rows, instructions = instructed_store
    loader = ContrastiveLoader(prefix, tokenizer, batch_size=16, task_weights="size",
                               max_query_length=512, instructions={"sts": instructions["sts"]})
    batches = [loader.make_batch(task, loader.store.example_ids_of_task(task))
               for task in loader.tasks]
    checked, apart_differs = 0, 0
    for batch in batches:
        for row_index, example_id in enumerate(batch.example_ids.tolist()):
            row = rows[example_id]
            instruction = row.get("instruction", instructions.get(row["task"]))
            texts = ([row["text1"], row["text2"]] if row["task"] == "sts"
                     else [row.get("query", row.get("text"))])
            ids = [batch.query_ids, batch.positive_ids][:len(texts)]
            lengths = [batch.query_lengths, batch.positive_lengths][:len(texts)]
            for text, side, side_lengths in zip(texts, ids, lengths):
                got = side[row_index, :int(side_lengths[row_index]) - 1].tolist()  # EOD off
                checked += 1
                if instruction is None:  # pair: no default instruction, none of its own
                    assert got == tokenizer.encode(text)
                    continue
                whole = format_instruction(instruction) + text
                assert got == tokenizer.encode(whole), (row["task"], text)
                apart = tokenizer.encode(format_instruction(instruction)) + tokenizer.encode(text)
                apart_differs += apart != got
    assert checked == len(rows) + 1
    assert apart_differs > 0  # the test can tell the two ways apart on this tokenizer


def test_loader_instruction_must_match_the_store(instructed_store, store_prefix, tokenizer):
    prefix, _, instructions = instructed_store
    ContrastiveLoader(prefix, tokenizer, 4, task_weights="size", instructions=instructions)
    with pytest.raises(ConfigError, match="cannot be applied exactly.*--instruction retrieval="):
        ContrastiveLoader(prefix, tokenizer, 4, task_weights="size",
                          instructions={"retrieval": "Find the answer"})
    with pytest.raises(ConfigError, match="no default instruction"):
        _loader(store_prefix, tokenizer, instructions={"sts": "Same meaning?"})


def test_picker_positions_and_duplicates(store_prefix, tokenizer):
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
    duplicating = _loader(store_prefix, tokenizer, tasks=["retrieval"], num_negatives=2,
                          negative_picker=lambda example_id, pool_size: [0, 0])
    with pytest.raises(ValueError, match="duplicate positions"):
        next(iter(duplicating))


def test_deferred_negatives_are_filled_by_the_step_with_the_global_batch_known(store_prefix, tokenizer):
    """With defer_mined_negatives the loader picks no mined negatives (DHNM's picker needs a
    collective first): retrieval/clr batches come pending, carrying the whole global batch, and
    add_negatives fills them as the loader would have."""
    class Recorder:
        def __init__(self):
            self.exchanged = []

        def exchange(self, global_ids):
            self.exchanged.append(global_ids.tolist())

        def __call__(self, example_id, pool_size):
            assert example_id in self.exchanged[-1]
            return range(min(pool_size, 2))

    pickers = [Recorder(), Recorder()]
    loaders = [_loader(store_prefix, tokenizer, rank, 2, num_negatives=2, defer_mined_negatives=True)
               for rank in range(2)]
    eager = [_loader(store_prefix, tokenizer, rank, 2, num_negatives=2) for rank in range(2)]
    mined_steps = 0
    for _ in range(12):
        batches = [next(loader) for loader in loaders]
        wanted = [next(loader) for loader in eager]
        global_batch = torch.cat([batch.example_ids for batch in batches]).tolist()
        assert all(batch.global_example_ids.tolist() == global_batch for batch in batches)
        if batches[0].task not in ("retrieval", "clr"):
            assert not any(batch.negatives_pending for batch in batches)
            continue
        mined_steps += 1
        for loader, picker, batch, want in zip(loaders, pickers, batches, wanted):
            assert batch.negatives_pending and batch.negative_ids is None
            picker.exchange(batch.global_example_ids)
            loader.builder.add_negatives(batch, picker)
            assert not batch.negatives_pending
            for name in ("negative_ids", "negative_lengths", "negative_mask", "negative_pool_positions"):
                assert torch.equal(getattr(batch, name), getattr(want, name)), name
    assert len(pickers[0].exchanged) == len(pickers[1].exchanged) == mined_steps > 0


def test_empty_pools_are_counted_and_located(tokenizer_model, tokenizer, tmp_path, caplog):
    source = tmp_path / "pools.jsonl"
    rows = [{"task": "retrieval", "query": f"q{i}", "positive": f"p{i}",
             "negatives": [f"n{i}.{j}" for j in range(i % 3)]} for i in range(9)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenize_contrastive(PreprocessConfig([str(source)], str(tmp_path / "s"), tokenizer_model,
                                          progress=False))
    with caplog.at_level("WARNING"):
        loader = ContrastiveLoader(str(tmp_path / "s"), tokenizer, 2, num_negatives=2)
    report = loader.pool_report
    assert (report.empty, report.short) == (3, 3)
    assert report.empty_examples[0] == f"example 0 ({source}:1)"
    assert report.empty_examples[2] == f"example 6 ({source}:7)"
    assert "3 retrieval/clr examples have an empty negative pool" in caplog.text
    assert ContrastiveLoader(str(tmp_path / "s"), tokenizer, 2, num_negatives=0).pool_report.empty == 0
    batch = loader.make_batch("retrieval", numpy.arange(9))
    assert batch.negative_mask.sum(dim=1).tolist() == [min(i % 3, 2) for i in range(9)]


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
        {"task": "sts", "text1": "a", "text2": "b", "score": float("nan")},
        {"task": "sts", "text1": "a", "text2": "b", "score": float("inf")},
        {"task": "sts", "text1": "a", "text2": "b", "score": float("-inf")},
        {"task": "pair", "query": "q", "positive": "p", "instruction": "  "},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = tokenize_contrastive(PreprocessConfig([str(source)], str(tmp_path / "s"),
                                                   tokenizer_model, progress=False))
    assert result.documents == 1
    counts = {kind: result.bad_lines.count(kind) for kind in BadLineKind}
    assert counts[BadLineKind.INVALID_VALUE] == 4
    assert counts[BadLineKind.MISSING_FIELD] == 3
    assert counts[BadLineKind.NON_STRING_FIELD] == 2
    assert counts[BadLineKind.EMPTY_TEXT] == 3
    invalid = result.bad_lines.examples[BadLineKind.INVALID_VALUE]
    assert [bad.line_number for bad in invalid] == [2, 10, 11, 12]
    assert "'score' is nan, not finite" in str(invalid[1])
    with pytest.raises(StrictModeError):
        tokenize_contrastive(PreprocessConfig([str(source)], str(tmp_path / "strict"),
                                              tokenizer_model, progress=False, strict=True))
    assert not list(tmp_path.glob("strict*"))


def test_tool_and_tokenizer_mismatch(jsonl_path, tokenizer_model, corpus_dir, tmp_path):
    tool = tokenize_contrastive_command
    assert tool.main(["--input", str(jsonl_path), "--output-prefix", str(tmp_path / "s"),
                      "--tokenizer-model", tokenizer_model, "--no-progress"]) == 0
    assert len(ContrastiveStore(str(tmp_path / "s"))) == 5 * PER_TASK
    assert tool.main(["--input", str(jsonl_path), "--output-prefix", str(tmp_path / "i"),
                      "--tokenizer-model", tokenizer_model, "--no-progress",
                      "--instruction", "sts=Same meaning? Yes=1", "--instruction",
                      "pair=Find it"]) == 0
    assert ContrastiveStore(str(tmp_path / "i")).instructions == {"sts": "Same meaning? Yes=1",
                                                                  "pair": "Find it"}
    for bad in (["--instruction", "ranking=Find it"], ["--instruction", "pair"]):  # a bad task, a bad option
        assert tool.main(["--input", str(jsonl_path), "--output-prefix",
                          str(tmp_path / "bad"), "--tokenizer-model", tokenizer_model,
                          "--no-progress"] + bad) == 2
    assert not list(tmp_path.glob("bad*"))
    other = tmp_path / "other"
    train_tokenizer([str(corpus_dir / "mixed.jsonl")], str(other),
                    TokenizerTrainingConfig(vocab_size=900, num_threads=1))
    with pytest.raises(DataError, match="another tokenizer"):
        ContrastiveLoader(str(tmp_path / "s"), ConanTokenizer(str(other) + ".model"), 4)


def test_incomplete_store_is_refused(store_prefix, tmp_path):
    import shutil

    for suffix in (".bin", ".idx", ".examples.npy"):
        shutil.copy(store_prefix + suffix, tmp_path / f"partial{suffix}")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ContrastiveStore(str(tmp_path / "partial"))
    numpy.testing.assert_array_equal(numpy.load(tmp_path / "partial.examples.npy")["task"],
                                     numpy.load(store_prefix + ".examples.npy")["task"])


def test_old_store_version_is_refused(store_prefix, tmp_path):
    import shutil

    for suffix in (".bin", ".idx", ".examples.npy", ".meta.json"):
        shutil.copy(store_prefix + suffix, tmp_path / f"old{suffix}")
    meta = json.loads((tmp_path / "old.meta.json").read_text())
    meta["version"] = 1
    (tmp_path / "old.meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="version-1 contrastive store.*re-tokenize"):
        ContrastiveStore(str(tmp_path / "old"))


def test_batches_carry_prompt_lengths_and_a_version_2_store_still_loads(store_prefix, tokenizer, tmp_path):
    import shutil

    store = ContrastiveStore(store_prefix)
    loader = ContrastiveLoader(store_prefix, tokenizer, 4, tasks=["sts", "retrieval"], seed=3)
    for batch in itertools.islice(iter(loader), 6):
        expected = torch.tensor([store.prompt_length(int(i)) for i in batch.example_ids])
        assert torch.equal(batch.query_prompt_lengths, expected)
        assert torch.equal(batch.positive_prompt_lengths,
                           expected if batch.task == "sts" else torch.zeros_like(expected))
    # a version-2 store (no prompt_length column): instructed rows count their task's instruction
    source = tmp_path / "plain.jsonl"
    with open(source, "w", encoding="utf-8") as handle:
        for i in range(4):
            handle.write(json.dumps({"task": "retrieval", "query": f"query {i}", "positive": f"passage {i}"}) + "\n")
            handle.write(json.dumps({"task": "pair", "query": f"pair {i}", "positive": f"text {i}"}) + "\n")
    new = str(tmp_path / "v3")
    instruction = "Find the passage"
    tokenize_contrastive(PreprocessConfig([str(source)], new, tokenizer.model_path, progress=False, workers=1,
                                          instructions={"retrieval": instruction}))
    old = str(tmp_path / "v2")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copyfile(new + suffix, old + suffix)
    rows = numpy.load(new + ".examples.npy")
    fields = [name for name in rows.dtype.names if name != "prompt_length"]
    numpy.save(old + ".examples.npy", numpy.array(rows[fields].tolist(), dtype=[(f, rows.dtype[f]) for f in fields]))
    meta = json.load(open(old + ".meta.json"))
    meta["version"] = 2
    json.dump(meta, open(old + ".meta.json", "w"))
    expected = len(tokenizer.encode(format_instruction(instruction)))
    v3, v2 = ContrastiveStore(new), ContrastiveLoader(old, tokenizer, 2, seed=3, tasks=["retrieval"]).store
    assert [v3.prompt_length(i) for i in range(8)] == [expected, 0] * 4
    assert [v2.prompt_length(i) for i in range(8)] == [expected, 0] * 4


def test_the_skipped_tails_are_counted_and_survive_a_resume(store_prefix, tokenizer):
    # 11 sts examples in global batches of 4: 2 full batches an epoch, 3 examples skipped each
    loader = ContrastiveLoader(store_prefix, tokenizer, 4, tasks=["sts"], drop_last=True, seed=3)
    batches = iter(loader)
    sizes = [next(batches).size for _ in range(2)]
    assert sizes == [4, 4] and loader.dropped_examples == 3  # the second batch ended the epoch
    resumed = ContrastiveLoader(store_prefix, tokenizer, 4, tasks=["sts"], drop_last=True, seed=3)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.dropped_examples == 3
    assert [next(batches).size for _ in range(2)] == [4, 4] and loader.dropped_examples == 6
    kept = ContrastiveLoader(store_prefix, tokenizer, 4, tasks=["sts"], drop_last=False, seed=3)
    assert [batch.size for batch in itertools.islice(iter(kept), 3)] == [4, 4, 3] and kept.dropped_examples == 0
