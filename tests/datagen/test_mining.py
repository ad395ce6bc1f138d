"""Hard-negative mining: exact top-k equals brute force, the pool rules, the report, the tool."""

import json
import zlib

import numpy
import pytest

from megatron_conan.cli import mine as mine_command
from megatron_conan.cli import tokenize_contrastive as tokenize_contrastive_command
from megatron_conan.datagen.mining import Example, MiningConfig, mine_file, mine_hard_negatives
from megatron_conan.eval.embedders import Embedder


class TableEmbedder(Embedder):
    """Deterministic random unit vectors per (prompt, text): a model whose scores the test knows."""

    def __init__(self, dim=16):
        self.name, self.dim, self.matryoshka_dims = "table", dim, []
        self.prompts = {"query": "Q: ", "document": ""}

    def _encode(self, texts, prefix, batch_size, show_progress):
        rows = []
        for text in texts:
            seed = zlib.crc32((prefix + "\0" + text).encode("utf-8"))
            vector = numpy.random.default_rng(seed).standard_normal(self.dim)
            rows.append(vector / numpy.linalg.norm(vector))
        return numpy.asarray(rows, dtype=numpy.float32)


def _examples(count):
    return [Example(line=row + 1, record={"task": "pair", "query": f"question {row}", "positive": f"answer {row}"},
                    query=f"question {row}", positive=f"answer {row}", prefix="Q: ") for row in range(count)]


def _brute_force_pools(examples, corpus, embedder, config):
    corpus_vectors = embedder.encode(corpus)
    pools = []
    for example in examples:
        query = embedder.encode([example.query], prompt_text=example.prefix)[0]
        positive = embedder.encode([example.positive])[0]
        scores = corpus_vectors @ query
        s_pos = float(query @ positive)
        ranked = [index for index in numpy.argsort(-scores, kind="stable") if corpus[index] != example.positive]
        kept = [index for index in ranked[config.skip_top:]
                if (config.absolute_margin is None or scores[index] <= s_pos - config.absolute_margin)
                and (config.relative_margin is None or scores[index] <= s_pos - config.relative_margin * abs(s_pos))]
        pools.append(kept[:config.pool_size])
    return pools


@pytest.mark.parametrize("config", [
    MiningConfig(num_negatives=3, pool_size=8, skip_top=2, query_block=7, corpus_block=11),
    MiningConfig(num_negatives=2, pool_size=5, skip_top=0, absolute_margin=0.1, relative_margin=0.05,
                 search_depth=300, corpus_block=64),
])
def test_pools_equal_brute_force(tmp_path, config):
    embedder = TableEmbedder()
    examples = _examples(40)
    corpus = [example.positive for example in examples] + [f"distractor {n}" for n in range(160)]
    pools, report = mine_hard_negatives(examples, corpus, embedder, config, str(tmp_path))
    assert pools == _brute_force_pools(examples, corpus, embedder, config)
    assert report["examples"] == 40 and report["corpus_texts"] == 200


def test_too_few_candidates_are_reported_by_line_and_still_written(tmp_path):
    embedder = TableEmbedder()
    records = [{"task": "pair", "query": f"q{n}", "positive": f"p{n}"} for n in range(6)]
    records.append({"task": "retrieval", "query": "q0", "positive": "p-other", "instruction": "Find it", "keep": 1})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    config = MiningConfig(num_negatives=4, pool_size=6, skip_top=1)
    report = mine_file(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), embedder, config)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(row["task"] == "retrieval" for row in rows) and rows[6]["keep"] == 1
    # 7 unique positives, minus the example's own, minus one skipped: 5 (the two "q0" examples have
    # different prompts, so each one excludes only its own positive)
    assert [len(row["negatives"]) + len(row["candidates"]) for row in rows] == [5] * 7
    assert all(len(row["negatives"]) == 4 for row in rows) and report["too_few_negatives"]["count"] == 0
    report = mine_file(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), embedder,
                       MiningConfig(num_negatives=6, pool_size=6, skip_top=1))
    assert report["too_few_negatives"]["count"] == 7
    assert report["too_few_negatives"]["examples"][0] == {"line": 1, "pool_size": 5}
    saved = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert saved["too_few_negatives"]["count"] == 7


def test_the_tool_mines_with_an_export_and_the_store_reads_it(artifacts, tmp_path, capsys):
    from megatron_conan.data.contrastive import ContrastiveStore
    from megatron_conan.datagen import synthetic

    synthetic.write_contrastive_jsonl(str(tmp_path / "pairs.jsonl"), examples_per_task=40, tasks=("pair",), seed=4)
    tool = mine_command
    assert tool.main(["--input", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "mined.jsonl"),
                      "--model", artifacts["sentence_transformer"], "--num-negatives", "3", "--pool-size", "6",
                      "--no-progress"]) == 0
    assert "40 examples" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert all(len(row["negatives"]) == 3 and len(row["candidates"]) == 3 for row in rows)
    assert all(row["positive"] not in row["negatives"] + row["candidates"] for row in rows)
    assert tokenize_contrastive_command.main(
        ["--input", str(tmp_path / "mined.jsonl"), "--output-prefix", str(tmp_path / "store"),
         "--tokenizer-model", artifacts["tokenizer"], "--no-progress"]) == 0
    store = ContrastiveStore(str(tmp_path / "store"))
    assert store.pool_size(0) == 6


def test_bad_records_and_options_are_refused(artifacts, tmp_path, capsys):
    tool = mine_command
    (tmp_path / "in.jsonl").write_text('{"task": "pair", "query": "q", "positive": "p"}\n'
                                       '{"task": "sts", "text1": "a", "text2": "b", "score": 1}\n')
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--model", artifacts["sentence_transformer"]]
    assert tool.main(argv) == 2
    assert "in.jsonl:2: task 'sts' has no (query, positive) to mine for" in capsys.readouterr().err
    assert tool.main(argv + ["--pool-size", "3"]) == 2
    assert "pool_size (3) must be >= num_negatives (7)" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
