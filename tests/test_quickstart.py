"""The README's first command keeps working: the whole tiny pipeline, fewer steps."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_conan.quickstart", "--work-dir", str(tmp_path / "qs"),
         "--pretrain-steps", "6", "--sft-steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pretrain (tiny, TP=2, blended indexed data)" in result.stdout
    assert "sft (from the pretrained checkpoint" in result.stdout
    for source in ("news", "qa", "web", "multilingual", "sft"):
        assert (tmp_path / "qs" / "indexed" / f"{source}.idx").exists()
    assert (tmp_path / "qs" / "pretrain" / "checkpoints" / "latest").exists()
    assert (tmp_path / "qs" / "sft" / "config.yaml").exists()
