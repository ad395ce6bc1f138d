"""Thirty bad configs, tried as a user would through a stage's own entry point (`main(argv)` of
``training.pretrain`` / ``training.embed_sup`` with ``--dry-run``, in this process: the command line's
whole parsing path, without a fresh interpreter per case): each is ONE stderr line
``conan-<stage>: error: <the dotted key> <the problem>``, status 2, and nothing on stdout.
tests/test_cli_errors.py runs a few of the same kind in subprocesses, end to end."""

import os

import pytest

from megatron_conan.training import embed_sup, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = {"pretrain": os.path.join(REPO, "examples", "tiny", "pretrain.yaml"),
           "embed-sup": os.path.join(REPO, "examples", "tiny", "embed_sup.yaml")}
MAINS = {"pretrain": pretrain.main, "embed-sup": embed_sup.main}
BLEND = "data.blend={sources: [{prefix: web}], split: '%s'}"

CASES = [
    # (stage, overrides, the whole error line after "conan-<stage>: error: ")
    # types
    ("pretrain", ["train.train_steps=abc"], "train.train_steps must be an integer, got 'abc'"),
    ("pretrain", ["train.seq_length=64.5"], "train.seq_length must be an integer, got 64.5 (float)"),
    ("pretrain", ["train.train_steps=true"], "train.train_steps must be an integer, got True"),
    ("pretrain", ["parallel.sequence_parallel=maybe"], "parallel.sequence_parallel must be true or false, got 'maybe'"),
    ("pretrain", ["optimizer.lr=.nan"], "optimizer.lr must be a finite number, got nan (float)"),
    ("pretrain", ["train.seq_length=null"], "train.seq_length must be set, got null"),
    ("pretrain", ["train=3"], "train must be a mapping, got 3 (int)"),
    # unknown keys, with the nearest valid key
    ("pretrain", ["train.lr=3e-4"], "unknown config key train.lr; did you mean optimizer.lr?"),
    ("pretrain", ["model.overrides={hiden_size: 128}"],
     "unknown config key model.overrides.hiden_size; did you mean model.overrides.hidden_size?"),
    ("pretrain", ["data.sft_prefix=x"], "unknown config key data.sft_prefix for data.kind=synthetic"),
    ("embed-sup", ["model.soft_mask={schedul: linear}"],
     "unknown config key model.soft_mask.schedul; did you mean model.soft_mask.schedule?"),
    # one field's range or set of values
    ("pretrain", ["optimizer.warmup_fraction=1.5"], "optimizer.warmup_fraction must be in [0, 1), got 1.5"),
    ("pretrain", ["optimizer.lr=0"], "optimizer.lr must be > 0, got 0"),
    ("pretrain", ["train.precision=fp8"], "train.precision must be one of 'fp32', 'bf16' or 'fp16', got 'fp8'"),
    ("pretrain", ["model.recipe=conan_7b"], "model.recipe must be one of 'conan_1p4b' or 'tiny', got 'conan_7b'"),
    ("pretrain", ["parallel.timeout_s=0"], "parallel.timeout_s must be > 0, got 0"),
    ("pretrain", ["checkpoint.keep_last=-1"], "checkpoint.keep_last must be >= 0, got -1"),
    ("pretrain", ["train.token_budget=-5"], "train.token_budget must be > 0, got -5"),
    ("pretrain", ["model.overrides={hidden_size: 0}"], "model.overrides.hidden_size must be >= 1, got 0"),
    ("embed-sup", ["embedding.pooling=max"], "embedding.pooling must be one of 'mean', 'last' or 'first', got 'max'"),
    ("embed-sup", ["embedding.task_batch_sizes={sts: 0}"], "embedding.task_batch_sizes.sts must be >= 1, got 0"),
    ("embed-sup", ["embedding.matryoshka_dims=[64, -1]"], "embedding.matryoshka_dims[1] must be >= 1, got -1"),
    ("embed-sup", ["embedding.dhnm.drop_ratio=0"], "embedding.dhnm.drop_ratio must be > 0, got 0"),
    # rules across fields of a section, and across sections
    ("pretrain", ["optimizer.min_lr=0.1"], "optimizer.min_lr must be in [0, optimizer.lr], got 0.1 (optimizer.lr is 0.003)"),
    ("pretrain", ["train.global_batch_size=10", "train.micro_batch_size=4"],
     "train.global_batch_size (10) is not divisible by train.micro_batch_size (4)"),
    ("pretrain", ["model.overrides={num_attention_heads: 7}"],
     "model.overrides.hidden_size (64) must be divisible by model.overrides.num_attention_heads (7)"),
    ("pretrain", ["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tensor_parallel > 1"),
    ("pretrain", ["parallel.virtual_pipeline_parallel=2"],
     "parallel.virtual_pipeline_parallel needs parallel.pipeline_parallel > 1"),
    ("pretrain", ["parallel.tensor_parallel=3"], "model.num_attention_heads (8) is not divisible by parallel.tensor_parallel (3)"),
    # data sections
    ("pretrain", ["data.kind=contrastive"], "data.kind must be one of 'blended', 'sft', 'synthetic', got 'contrastive'"),
    ("pretrain", ["data.kind=blended"], "data.blend is required for data.kind=blended"),
    ("pretrain", ["data.kind=blended", "data.blend={sources: [{prefix: web, weight: 0}]}"],
     "data.blend.sources[0].weight must be > 0, got 0"),
    ("pretrain", ["data.kind=blended", BLEND % "98,1"],
     "data.blend.split must be three non-negative numbers like '98,1,1', got '98,1'"),
    ("embed-sup", ["data.kind=blended"], "data.kind must be one of 'contrastive', got 'blended'"),
    # the command line itself
    ("pretrain", ["optimizer.lr=[1,"], "override optimizer.lr: the value '[1,' is not valid YAML"),
    # the runtime's world size, checked once the layout meets it
    ("pretrain", ["--world-size", "6", "parallel.tensor_parallel=4"],
     "world size 6 is not divisible by parallel.tensor_parallel * parallel.pipeline_parallel = 4 * 1"),
]


def test_the_cases_are_thirty_distinct_configs():
    assert len({(stage, tuple(overrides)) for stage, overrides, _ in CASES}) == len(CASES) >= 30
    assert len({line for _, _, line in CASES}) == len(CASES)


@pytest.mark.parametrize("stage,overrides,line", CASES, ids=[" ".join(case[1]) for case in CASES])
def test_a_bad_config_is_one_line_naming_the_key_and_exit_2(stage, overrides, line, capsys):
    code = MAINS[stage](["--dry-run", "--config", RECIPES[stage], *overrides])
    out, err = capsys.readouterr()
    assert (code, out, err) == (2, "", f"conan-{stage}: error: {line}\n")
