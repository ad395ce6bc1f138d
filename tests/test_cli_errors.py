"""Bad configuration and input, tried as a new user would, through the real entry points: each ends
in ONE line on stderr naming the field or path (`<prog>: error: ...`), exit status 2, no traceback
and no partial output. Also the wrapper itself (errors.run_main): rank 0 prints, bugs keep their
traceback."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_conan.errors import ConfigError, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "examples", "tiny", "pretrain.yaml")
PRETRAIN = [sys.executable, "-m", "megatron_conan.training.pretrain"]


def _env():
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _run(command, cwd=REPO):
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if ": error: " in line]


def _assert_one_line_error(code, stderr, prog, *fragments, only_line=True):
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    if only_line:
        assert len(lines) == 1, lines
    errors = _error_lines(stderr)
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith(f"{prog}: error: "), lines[-5:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.fixture(scope="module")
def bad_recipes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("recipes")
    (directory / "malformed.yaml").write_text("train:\n  train_steps: [1, 2\nmodel: {\n")
    (directory / "list.yaml").write_text("- train\n- model\n")
    return directory


DRY_RUN_CASES = {
    # name: (stage, arguments after --dry-run, fragments of the one error line); the config's own
    # refusals are tried in-process, thirty of them, by tests/config/test_bad_configs.py: these few
    # show the same line and status end to end, from a fresh interpreter
    "missing recipe file": ("pretrain", ["--config", "/nonexistent.yaml"], ["no such file or directory: /nonexistent.yaml"]),
    "recipe is a directory": ("pretrain", ["--config", "{recipes}"], ["is a directory: {recipes}"]),
    "malformed YAML": ("pretrain", ["--config", "{recipes}/malformed.yaml"], ["malformed YAML in {recipes}/malformed.yaml line "]),
    "recipe is not a mapping": ("pretrain", ["--config", "{recipes}/list.yaml"], ["a recipe is a YAML mapping of sections"]),
    "wrong type": ("pretrain", ["train.train_steps=abc"], ["train.train_steps must be an integer, got 'abc'"]),
    "unknown key": ("pretrain", ["train.lr=3e-4"], ["unknown config key train.lr; did you mean optimizer.lr?"]),
    "world size not divisible by the layout": ("pretrain", ["--world-size", "6", "parallel.tensor_parallel=4"],
                                               ["world size 6 is not divisible by parallel.tensor_parallel"]),
    "embedding value out of range": ("embed_sup", ["embedding.task_batch_sizes={sts: 0}"],
                                     ["embedding.task_batch_sizes.sts must be >= 1, got 0"]),
}
STAGE_RECIPES = {"pretrain": TINY, "embed_sup": os.path.join(REPO, "examples", "tiny", "embed_sup.yaml")}


@pytest.fixture(scope="module")
def dry_runs(bad_recipes):
    """Every dry-run case, run concurrently (each is a fresh interpreter: most of its time is imports)."""
    def command(stage, arguments):
        arguments = [argument.replace("{recipes}", str(bad_recipes)) for argument in arguments]
        recipe = ["--config", STAGE_RECIPES[stage]] if "--config" not in arguments else []
        return [sys.executable, "-m", f"megatron_conan.training.{stage}", "--dry-run"] + recipe + arguments

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run, command(stage, arguments))
                   for name, (stage, arguments, _) in DRY_RUN_CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", sorted(DRY_RUN_CASES))
def test_bad_configuration_is_one_line_and_exit_2(name, dry_runs, bad_recipes):
    code, stdout, stderr = dry_runs[name]
    stage, _, fragments = DRY_RUN_CASES[name]
    fragments = [fragment.replace("{recipes}", str(bad_recipes)) for fragment in fragments]
    _assert_one_line_error(code, stderr, f"conan-{stage.replace('_', '-')}", *fragments)
    assert stdout == "", stdout  # no half report


def test_a_good_dry_run_still_reports(tmp_path):
    code, stdout, stderr = _run(PRETRAIN + ["--dry-run", "--config", TINY, "train.train_steps=1e3"])
    assert code == 0 and "Traceback" not in stderr, stderr
    assert stdout.strip()


# -- training runs: the error surfaces after the process group and the model exist --------------

@pytest.fixture(scope="module")
def tokenizer_1000(tmp_path_factory):
    """A 1000-piece tokenizer trained by the tool itself on the repo's synthetic corpus."""
    from megatron_conan.datagen import synthetic

    directory = tmp_path_factory.mktemp("tokenizer")
    synthetic.write_pretraining_jsonl(str(directory / "corpus.jsonl"), num_docs=200, seed=0)
    code, stdout, stderr = _run([sys.executable, "-m", "megatron_conan.cli.train_tokenizer", "--input",
                                 str(directory / "corpus.jsonl"), "--model-prefix", str(directory / "tok"),
                                 "--vocab-size", "1000", "--num-threads", "1"])
    assert code == 0, stderr[-3000:]
    return directory


def _train(run_dir, *overrides):
    return _run(PRETRAIN + ["--config", TINY, f"run_dir={run_dir}", "train.eval_interval=0", "train.train_steps=1",
                            "checkpoint.save_interval=0", *overrides])


def _no_checkpoint(run_dir):
    checkpoints = os.path.join(run_dir, "checkpoints")
    return not os.path.exists(checkpoints) or not os.listdir(checkpoints)


BLEND = "data.blend={sources: [{prefix: %s}]}"


@pytest.mark.slow
def test_training_input_errors_are_one_line_and_exit_2(tmp_path, tokenizer_1000):
    """Missing tokenizer, tokenizer/model vocabulary mismatch, missing data source, a load_dir that is
    no checkpoint, a checkpoint of another shape: one error line after the logs, nothing saved."""
    tokenizer = str(tokenizer_1000 / "tok.model")
    cases = {
        "missing tokenizer file": (["data.kind=blended", BLEND % "web", "data.tokenizer=/nonexistent.model"],
                                   ["data.tokenizer: no such file: /nonexistent.model"]),
        "vocabulary mismatch": (["data.kind=blended", BLEND % "web", f"data.tokenizer={tokenizer}"],
                                ["the model's vocabulary (512 ids", "model.overrides.vocab_size=1000"]),
        "missing data source": (["data.kind=blended", BLEND % str(tmp_path / "nothing"), f"data.tokenizer={tokenizer}",
                                 "model.overrides={vocab_size: 1000}"], ["no " + str(tmp_path / "nothing") + ".bin/.idx"]),
        "load_dir is not a checkpoint": ([f"checkpoint.load_dir={tokenizer_1000}"],
                                         [f"{tokenizer_1000} is not a checkpoint directory"]),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_train, tmp_path / name.replace(" ", "_"), *overrides)
                   for name, (overrides, _) in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    for name, (_, fragments) in cases.items():
        code, _, stderr = results[name]
        _assert_one_line_error(code, stderr, "conan-pretrain", *fragments, only_line=False)
        assert _no_checkpoint(tmp_path / name.replace(" ", "_")), name


@pytest.mark.slow
def test_a_checkpoint_of_another_shape_is_one_line_and_keeps_latest(tmp_path):
    code, _, stderr = _train(tmp_path)
    assert code == 0, stderr[-3000:]
    code, _, stderr = _train(tmp_path, "train.train_steps=2", "model.overrides={hidden_size: 128, ffn_hidden_size: 256}")
    _assert_one_line_error(code, stderr, "conan-pretrain", "was written for a different model shape",
                           "hidden_size: checkpoint 64 vs model 128", only_line=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["iter_0000001", "latest", "latest_checkpointed_iteration.txt"]


def test_tool_input_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
    from megatron_conan.datagen import synthetic

    corpus = tmp_path / "pairs.jsonl"
    synthetic.write_pretraining_jsonl(str(corpus), num_docs=5, seed=0)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    out = tmp_path / "out"
    contrastive = [sys.executable, "-m", "megatron_conan.cli.tokenize_contrastive", "--no-progress",
                   "--output-prefix", str(out / "store")]
    tokenizer = [sys.executable, "-m", "megatron_conan.cli.train_tokenizer", "--model-prefix", str(out / "tok")]
    cases = {
        "missing tokenizer model": (contrastive + ["--input", str(corpus), "--tokenizer-model", "/nonexistent.model"],
                                    "conan-tokenize-contrastive", "tokenizer_model: no such file '/nonexistent.model'"),
        "missing input": (contrastive + ["--input", str(tmp_path / "nope.jsonl"), "--tokenizer-model", "/x.model"],
                          "conan-tokenize-contrastive", "inputs: no such file"),
        "vocab size too small": (tokenizer + ["--input", str(corpus), "--vocab-size", "100"],
                                 "conan-train-tokenizer", "vocab_size=100 leaves no room"),
        "no usable text": (tokenizer + ["--input", str(tmp_path / "empty.jsonl"), "--vocab-size", "1000"],
                           "conan-train-tokenizer", "no usable text in"),
        "missing tokenizer input": (tokenizer + ["--input", str(tmp_path / "nope.txt"), "--vocab-size", "1000"],
                                    "conan-train-tokenizer", str(tmp_path / "nope.txt")),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run, command) for name, (command, _, _) in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    for name, (_, prog, fragment) in cases.items():
        code, stdout, stderr = results[name]
        _assert_one_line_error(code, stderr, prog, fragment, only_line=False)
        assert not out.exists() or not os.listdir(out), (name, os.listdir(out))


# -- the wrapper ----------------------------------------------------------------------------------

def _bad_config(argv):
    raise ConfigError("train.lr is not a key\nsecond line folded")


def _bug(argv):
    raise KeyError("a bug keeps its traceback")


def test_run_main_prints_on_rank_0_only_and_every_rank_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    assert run_main(_bad_config, [], prog="conan") == 2
    assert capsys.readouterr().err == "conan: error: train.lr is not a key; second line folded\n"
    monkeypatch.setenv("RANK", "3")
    assert run_main(_bad_config, [], prog="conan") == 2
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert run_main(_bad_config, [], prog="conan") == 2
    assert capsys.readouterr().err == ""
    with pytest.raises(KeyError, match="a bug"):
        run_main(_bug, [])
    assert run_main(lambda argv: None, []) == 0
