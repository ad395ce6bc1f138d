"""Issue 13 item 3: before the first step, data tokenized by another tokenizer than the run's is
refused with one line (the dataset's recorded tokenizer hash against the given tokenizer)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sft_data_of_another_tokenizer_is_refused(embedding_data, tmp_path):
    from megatron_conan.data.tokenizer import TokenizerTrainingConfig, train_tokenizer
    from megatron_conan.datagen import synthetic

    synthetic.write_sft_jsonl(str(tmp_path / "sft.jsonl"), num_examples=40)
    subprocess.run([sys.executable, "-m", "megatron_conan.cli.preprocess", "--format", "sft", "--input", str(tmp_path / "sft.jsonl"),
                    "--output-prefix", str(tmp_path / "sft"), "--tokenizer-model", embedding_data["tokenizer"],
                    "--no-progress"], cwd=REPO, check=True, capture_output=True)
    train_tokenizer([str(embedding_data["dir"] / "text.jsonl")], str(tmp_path / "other"),
                    TokenizerTrainingConfig(vocab_size=512, num_threads=1, seed=7, max_sentences=150,
                                            character_coverage=0.98))
    env = dict(os.environ)
    env.pop("RANK", None)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_conan.training.sft", "--config", "examples/tiny/sft.yaml",
         f"run_dir={tmp_path / 'run'}", "checkpoint.load_dir=null", f"data.sft_prefix={tmp_path / 'sft'}",
         f"data.tokenizer={tmp_path / 'other.model'}", "train.train_steps=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "another tokenizer" in lines[0], result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
