"""conan-eval's metrics equal a hand computation; BM25 and random baselines run on the same set."""

import json
import math
import os

import pytest

from megatron_conan.eval.beir import load_beir
from megatron_conan.eval.metrics import retrieval_metrics
from megatron_conan.errors import DataError

BEIR_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "beir_tiny")


def test_fixed_run_gives_the_hand_computed_metrics():
    dataset = load_beir(BEIR_TINY)
    assert dataset.query_ids == ["q1", "q2", "q3", "q4", "q5"]  # q6 has no judgement
    assert dataset.doc_texts[4].startswith("The for statement") and dataset.doc_texts[0].startswith("Lists A list")
    docs = [f"d{n:02d}" for n in range(1, 13)]

    def ranking(*first):
        rest = [doc for doc in docs if doc not in first]
        return {doc: float(12 - rank) for rank, doc in enumerate(list(first) + rest)}

    run = {"q1": ranking("d02", "d05", "d01"),  # relevant at ranks 1 (gain 1) and 3 (gain 2)
           "q2": ranking("d07"),  # rank 1
           "q3": ranking("d01", "d02", "d03", "d04", "d05", "d06", "d07", "d08"),  # d08 (gain 2) at rank 8, d09 at 9
           "q4": ranking(*[doc for doc in docs if doc != "d10"]),  # d10 last, rank 12: outside the top 10
           "q5": ranking("d03", "d04")}  # d03 is judged 0 (not relevant), d04 at rank 2
    metrics = retrieval_metrics(dataset.qrels, run)

    def dcg(gains):
        return sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains))

    ndcg = [dcg([1, 0, 2]) / dcg([2, 1]), 1.0, dcg([0] * 7 + [2, 1]) / dcg([2, 1]), 0.0, dcg([0, 1]) / dcg([1])]
    assert metrics["ndcg_at_10"] == pytest.approx(sum(ndcg) / 5, abs=1e-4)  # trec_eval rounds gains to 4 digits
    assert metrics["recall_at_10"] == pytest.approx((1 + 1 + 1 + 0 + 1) / 5)
    assert metrics["recall_at_100"] == pytest.approx(1.0)
    assert metrics["mrr_at_10"] == pytest.approx((1 + 1 + 1 / 8 + 0 + 1 / 2) / 5)
    assert metrics["num_queries"] == 5


def test_ties_rank_by_document_id_and_missing_queries_count_as_zero():
    qrels = {"a": {"x1": 1}, "b": {"y": 1}}
    run = {"a": {"x1": 0.5, "x2": 0.5}}  # tie: trec_eval puts x2 (higher id) first; "b" is not in the run
    metrics = retrieval_metrics(qrels, run)
    assert metrics["mrr_at_10"] == pytest.approx((1 / 2 + 0) / 2)
    assert metrics["num_queries"] == 2


@pytest.fixture(scope="module")
def eval_tool():
    from megatron_conan.eval import retrieval_cli

    return retrieval_cli


def test_conan_eval_metrics_equal_a_hand_computation_of_its_runs(eval_tool, artifacts, tmp_path, capsys):
    output, runs_path = tmp_path / "results.json", tmp_path / "runs.json"
    assert eval_tool.main([BEIR_TINY, "--model", artifacts["sentence_transformer"], "--baselines", "bm25,random",
                           "--output", str(output), "--save-runs", str(runs_path), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "ndcg_at_10" in table and "bm25" in table and "random" in table
    results = json.loads(output.read_text())["results"]
    runs = json.loads(runs_path.read_text())
    qrels = load_beir(BEIR_TINY).qrels
    for system, metrics in results.items():
        assert metrics["num_queries"] == 5
        hand = _hand_metrics(qrels, runs[system])
        for name, value in hand.items():
            assert metrics[name] == pytest.approx(value, abs=1e-4), (system, name)
    assert results["bm25"]["ndcg_at_10"] > results["random"]["ndcg_at_10"]  # word overlap beats chance here
    assert results[artifacts["sentence_transformer"]]["dim"] == 64


def _hand_metrics(qrels, run):
    """nDCG@10 (log2 discount, graded gains), recall@10/100 and MRR@10 written out, ties by id desc."""
    totals = {"ndcg_at_10": 0.0, "recall_at_10": 0.0, "recall_at_100": 0.0, "mrr_at_10": 0.0}
    for query, judged in qrels.items():
        ranked = [doc for doc, _ in sorted(run.get(query, {}).items(), key=lambda item: (item[1], item[0]), reverse=True)]
        relevant = {doc for doc, gain in judged.items() if gain > 0}
        dcg = sum(judged.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:10]))
        ideal = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(sorted(judged.values(), reverse=True)[:10]))
        totals["ndcg_at_10"] += dcg / ideal
        totals["recall_at_10"] += len(relevant & set(ranked[:10])) / len(relevant)
        totals["recall_at_100"] += len(relevant & set(ranked[:100])) / len(relevant)
        first = next((rank for rank, doc in enumerate(ranked[:10]) if doc in relevant), None)
        totals["mrr_at_10"] += 0.0 if first is None else 1.0 / (first + 1)
    return {name: value / len(qrels) for name, value in totals.items()}


def test_random_baseline_is_seeded(eval_tool, tmp_path, capsys):
    outputs = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        path = tmp_path / f"{name}.json"
        assert eval_tool.main([BEIR_TINY, "--baselines", "random", "--seed", seed, "--save-runs", str(path)]) == 0
        outputs.append(json.loads(path.read_text())["random"])
    assert outputs[0] == outputs[1] != outputs[2]


@pytest.mark.parametrize("argv,message", [
    (["--baselines", "bm42"], "unknown baseline(s) bm42"),
    ([], "nothing to evaluate"),
    (["--baselines", "bm25", "--split", "dev"], "qrels/dev.tsv does not exist"),
])
def test_bad_input_is_one_line_and_status_2(eval_tool, capsys, argv, message):
    assert eval_tool.main([BEIR_TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("conan-eval: error: ") and message in err, err


def test_a_malformed_dataset_names_file_and_line(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": 5}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: field 'text' is a int, not a string"):
        load_beir(str(tmp_path))
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td9\t1\n")
    with pytest.raises(DataError, match="name a corpus id that is not in the dataset, e.g. 'd9'"):
        load_beir(str(tmp_path))


def test_the_report_skips_a_torn_last_metrics_line_and_says_so(tmp_path, caplog):
    from megatron_conan.eval.report import read_metrics

    lines = '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n'
    (tmp_path / "metrics.jsonl").write_text(lines + '{"step": 3, "lo')  # killed while appending step 3
    with caplog.at_level("WARNING"):
        assert [record["step"] for record in read_metrics(str(tmp_path))] == [1, 2]
    assert "metrics.jsonl:3: skipped the torn last line" in caplog.text
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n' + lines)  # not the last line: an error
    with pytest.raises(DataError, match="metrics.jsonl:1: not a metrics record"):
        read_metrics(str(tmp_path))
