"""Issue 18 item 3: the prepared GPU check runs on CPU (--cpu) within its budget and reports every
part: ran (with figures), partial (stopped at its share, with what it measured) or skipped (with
its reason); bad input is one line."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["kernels", "kernel_speed", "train_step", "embed_step", "encode", "stages"]


def _check(tmp_path, *argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "megatron_conan.cli.gpu_check", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


@pytest.mark.slow  # its 35 s budget
def test_cpu_check_reports_every_part_within_its_budget(tmp_path):
    """A budget that holds the first parts' CPU shapes and not the last ones': every part is reported,
    ran (with figures), stopped (partial) or skipped, with its reason, whatever the machine's load;
    the scheduler keeps the whole within the budget (wall_s counts from the command's start)."""
    budget = 35
    result = _check(tmp_path, "--cpu", "--budget-s", str(budget), "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [part["part"] for part in report["parts"]] == PARTS
    assert report["wall_s"] <= budget
    for part in report["parts"]:
        assert part["status"] in ("ran", "partial", "skipped"), part
        if part["status"] != "ran":
            assert part["reason"], part
        if part["status"] == "ran":
            assert part["figures"], part
    assert report["parts"][-1]["status"] == "skipped"  # the stages' CPU seconds alone exceed the budget
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| part | status | figure | value |" in table and all(f"| {name} |" in table for name in PARTS)


def test_a_part_runs_on_cpu_with_its_figures(tmp_path):
    """What the budgeted check cannot promise on a loaded machine, without a budget: the kernels part
    runs its CPU shapes, Triton's fp32 rows within their bounds, CUDA's skipped for no CUDA."""
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check_parts", "kernels", "--cpu", "--out", str(out),
                             "--scratch", str(tmp_path / "scratch")], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["status"] == "ran" and report["skipped"]["cuda"] == "no CUDA", report
    assert report["figures"]["triton float32 a=0.3 error/bound"] <= 1


def test_a_short_budget_runs_the_first_parts_whole_and_skips_the_last():
    """The order is the priority: a part whose weighted share is below what it needs gets what it
    needs while the time left holds it; on CPU the weights and needs are the measured CPU seconds."""
    from megatron_conan.cli.gpu_check import load_check

    check = load_check()
    need = [part.cpu_s for part in check.PARTS]
    assert check.share_of(0, 30, cpu=True) == need[0]  # 30 s weighted over all: less than its need
    assert check.share_of(len(PARTS) - 1, need[-1] - 1, cpu=True) == need[-1] - 1  # too little: _run_part skips
    roomy = 2 * sum(need)
    assert [round(check.share_of(i, roomy - 2 * sum(need[:i]), cpu=True), 6) for i in range(len(PARTS))] == \
        [2 * n for n in need]  # room for all: each its weight's share, twice its need here
    assert check.share_of(0, 400) == pytest.approx(400 * 0.30)  # on a GPU the declared shares


def test_a_tiny_budget_skips_every_part_with_its_reason(tmp_path):
    result = _check(tmp_path, "--cpu", "--budget-s", "5", "--out-dir", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [part["status"] for part in report["parts"]] == ["skipped"] * len(PARTS)
    assert all("it needs" in part["reason"] for part in report["parts"])


def test_bad_budget_is_one_line(tmp_path):
    result = _check(tmp_path, "--cpu", "--budget-s", "-1", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "conan-gpu-check: error: --budget-s must be positive, got -1"


def test_a_missing_module_is_taken_from_the_offline_bundle(tmp_path, monkeypatch):
    """Issue 31 item 2: where a module the check loads is missing, the bundle's wheels are installed
    with pip --no-index --no-deps --target into a temporary directory, which the parts then find."""
    import megatron_conan.gpu_node.imports as imports
    from megatron_conan.cli.gpu_check import load_check
    from tests.gpu_node.test_bundle import _wheel

    check = load_check()
    bundle_dir = tmp_path / "gpu-bundle"
    bundle_dir.mkdir()
    file = os.path.basename(_wheel(str(bundle_dir), "offline-probe", "1.0", "offline_probe"))
    (bundle_dir / "MANIFEST.json").write_text(json.dumps({
        "python": f"{sys.version_info.major}.{sys.version_info.minor}", "left_out": {}, "total_bytes": 1,
        "wheels": [{"file": file, "name": "offline-probe", "version": "1.0", "bytes": 1}]}))
    monkeypatch.setattr(imports, "check_imports", lambda repo: imports.CheckImports(("offline_probe", "torch"), ()))
    target = str(tmp_path / "target")
    assert check._missing(["offline_probe"]) == ["offline_probe"]
    used = check.use_bundle(str(bundle_dir), target)
    assert used["used"] and used["wheels"] == [file] and used["missing"] == ["offline_probe"]
    assert used["target"] == target and "--no-index --no-deps --target" in used["how"]
    assert check._missing(["offline_probe"], [target]) == []
    assert check.use_bundle(str(tmp_path / "none"), target)["reason"].startswith("no readable bundle manifest")
    monkeypatch.setattr(imports, "check_imports", lambda repo: imports.CheckImports(("torch",), ()))
    assert check.use_bundle(str(bundle_dir), target) == {"used": False,
                                                         "reason": "every module the check loads is installed"}


def test_the_expected_gpu_seconds_fit_their_shares_and_nine_minutes():
    """Issue 31 item 6: at make gpu-check's budget each part's estimated H100 seconds (docs/GPU.md)
    fit the share it gets of what the parts before it leave, and the whole stays under 9 minutes."""
    from megatron_conan.cli.gpu_check import load_check

    check = load_check()
    assert [part.name for part in check.PARTS] == PARTS
    budget, start_up = 510, 10  # make gpu-check's BUDGET_S; start-up and the bundle's install, before the first part
    left = budget - min(10.0, 0.05 * budget) - start_up
    for index, part in enumerate(check.PARTS):
        share = check.share_of(index, left)
        assert part.min_s <= part.expected_s <= share, (part.name, part.expected_s, share)
        left -= part.expected_s
    assert start_up + sum(part.expected_s for part in check.PARTS) < 9 * 60
