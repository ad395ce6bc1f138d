import json

from megatron_conan.datagen import synthetic


def test_documents_are_deterministic_and_cover_scripts(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    synthetic.write_pretraining_jsonl(str(first), num_docs=200, seed=3)
    synthetic.write_pretraining_jsonl(str(second), num_docs=200, seed=3)
    assert first.read_bytes() == second.read_bytes()
    rows = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    assert {row["source"] for row in rows} == set(synthetic.SOURCES)
    text = "".join(row["text"] for row in rows)
    for probe in ("a", "д", "ب", "城", "の", "도"):  # Latin, Cyrillic, Arabic, CJK, kana, Hangul
        assert probe in text


def test_size_limited_corpus_and_compression(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    count = synthetic.write_pretraining_jsonl(str(path), num_bytes=50_000, sources=["news"])
    assert count > 10


def test_contrastive_and_sft_rows(tmp_path):
    path = tmp_path / "c.jsonl"
    assert synthetic.write_contrastive_jsonl(str(path), examples_per_task=3) == 15
    tasks = [json.loads(line)["task"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert set(tasks) == {"pair", "retrieval", "clr", "classification", "sts"}
    sft = tmp_path / "s.jsonl"
    synthetic.write_sft_jsonl(str(sft), num_examples=6)
    rows = [json.loads(line) for line in sft.read_text(encoding="utf-8").splitlines()]
    assert all(row["instruction"] and row["output"] for row in rows)
    assert any("input" not in row for row in rows) and any(row.get("input") for row in rows)
