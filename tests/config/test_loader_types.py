"""Typed configuration: YAML values and dotted overrides become the declared field types, unknown
keys are refused with the closest valid key, and every example key the project shows is valid."""

import dataclasses
import glob
import importlib
import os
import re
import typing
from typing import Dict, List, Optional, Union

import pytest
import yaml

from megatron_conan.config.loader import convert, dump_config, from_dict, load_config
from megatron_conan.config.model import ConanModelConfig
from megatron_conan.errors import ConfigError, InputError
from megatron_conan.config.run import STAGE_CONFIGS, EmbeddingConfig, LanguageModelConfig, load_run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny", "embed_weak.yaml")  # every section but the LM data kinds
RECIPES = sorted(glob.glob(os.path.join(REPO, "examples", "*", "*.yaml")))


def _stage_of(recipe: str) -> str:
    """examples/<size>/<stage>.yaml -> the stage id."""
    return os.path.basename(recipe)[:-len(".yaml")].replace("_", "-")


def _load(*overrides) -> EmbeddingConfig:
    return load_config(EmbeddingConfig, TINY, list(overrides))


def _refused(*overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(*overrides)
    assert isinstance(caught.value, InputError) and "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("raw,expected", [("1e6", 1_000_000), ("1.0e+6", 1_000_000), ("250", 250), ("1_000", 1000),
                                          ("3.0", 3)])
def test_integral_values_are_accepted_for_an_int_field(raw, expected):
    value = _load(f"train.train_steps={raw}").train.train_steps
    assert value == expected and type(value) is int


@pytest.mark.parametrize("raw,shown", [("abc", "'abc'"), ("1.5", "1.5"), ("true", "True"), ("[1]", "[1]")])
def test_non_integers_are_refused_for_an_int_field(raw, shown):
    message = _refused(f"train.train_steps={raw}")
    assert message.startswith("train.train_steps must be an integer") and shown in message, message


def test_numbers_read_as_yaml_1_2_does():
    # PyYAML (YAML 1.1) reads 1e6 without a dot as a string; the loader reads it as a float
    assert _load("train.train_steps=1e6", "optimizer.lr=1E-4").optimizer.lr == 1e-4
    assert _refused("train.train_steps=1e400") == "train.train_steps must be a finite number, got inf (float)"


def test_floats_from_yaml_strings_ints_and_refusals():
    cfg = _load("optimizer.lr=3e-4", "optimizer.min_lr=0", "train.token_budget=3e12")
    assert cfg.optimizer.lr == 3e-4 and type(cfg.optimizer.min_lr) is float and cfg.train.token_budget == 3e12
    assert _refused("optimizer.lr=abc") == "optimizer.lr must be a number, got 'abc'"
    assert _refused("optimizer.lr=yes").startswith("optimizer.lr must be a number")


@pytest.mark.parametrize("raw,expected", [("yes", True), ("true", True), ("on", True), ("1", True), ("'Yes'", True),
                                          ("no", False), ("false", False), ("0", False), ("off", False)])
def test_bools_as_yaml_reads_them(raw, expected):
    assert _load(f"parallel.use_distributed_optimizer={raw}").parallel.use_distributed_optimizer is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "1.0", "[true]"])
def test_other_values_are_refused_for_a_bool(raw):
    assert _refused(f"parallel.use_distributed_optimizer={raw}").startswith(
        "parallel.use_distributed_optimizer must be true or false")


def test_strings_optionals_lists_dicts_and_sections():
    cfg = _load("run_dir=2024", "train.exit_after_steps=null", "embedding.matryoshka_dims=[64, 1e2, '32']",
                "embedding.matryoshka_weights={64: 1, '32': 0.5}", "embedding.task_batch_sizes={sts: 3.0}")
    assert cfg.run_dir == "2024" and cfg.train.exit_after_steps is None
    assert cfg.embedding.matryoshka_dims == [64, 100, 32]
    assert cfg.embedding.matryoshka_weights == {64: 1.0, 32: 0.5}
    assert all(type(v) is float for v in cfg.embedding.matryoshka_weights.values())
    assert cfg.embedding.task_batch_sizes == {"sts": 3}
    assert _refused("run_dir=no") == "run_dir must be a string, got False (bool)"
    assert _refused("train.precision=no") == "train.precision must be one of 'fp32', 'bf16' or 'fp16', got False (bool)"
    assert _refused("train.seq_length=null") == "train.seq_length must be set, got null"
    assert _refused("embedding.matryoshka_dims=64").startswith("embedding.matryoshka_dims must be a list")
    assert _refused("embedding.matryoshka_dims=[64, x]").startswith("embedding.matryoshka_dims[1] must be an integer")
    assert _refused("embedding.matryoshka_weights={x: 1}").startswith(
        "embedding.matryoshka_weights key 'x' must be an integer")
    assert _refused("embedding.task_weights={sts: heavy}") == "embedding.task_weights.sts must be a number, got 'heavy'"
    assert _refused("train=3") == "train must be a mapping, got 3 (int)"


@dataclasses.dataclass
class _Inner:
    width: int = 1
    """A width."""


@dataclasses.dataclass
class _Outer:
    size: Union[int, str] = 1
    """A number of items, or `auto`."""
    ratio: Optional[Union[float, List[float]]] = None
    """One ratio or one per stage."""
    inner: Optional[_Inner] = None
    """An optional section."""
    table: Dict[str, _Inner] = dataclasses.field(default_factory=dict)
    """Named sections."""


@dataclasses.dataclass
class _Shapes:
    mode: typing.Literal["mean", "last"] = "mean"
    """A closed set of names."""
    pair: typing.Tuple[int, str] = (1, "a")
    """One type per place."""
    sizes: typing.Tuple[int, ...] = ()
    """Any number of ints."""
    limit: "int | None" = None
    """PEP 604 optional."""


def test_literals_tuples_pep604_optionals_and_nan():
    built = from_dict(_Shapes, {"mode": "last", "pair": ["2.0", 3], "sizes": [1, "10"], "limit": "5"})
    assert built == _Shapes("last", (2, "3"), (1, 10), 5)
    assert from_dict(_Shapes, {"limit": None}).limit is None
    with pytest.raises(ConfigError, match=r"^mode must be one of 'mean' or 'last', got 'max'$"):
        from_dict(_Shapes, {"mode": "max"})
    with pytest.raises(ConfigError, match=r"^pair must have 2 items, got 3$"):
        from_dict(_Shapes, {"pair": [1, "a", 2]})
    assert _refused("optimizer.lr=.nan") == "optimizer.lr must be a finite number, got nan (float)"


def test_unions_optional_sections_and_sections_in_dicts():
    assert from_dict(_Outer, {"size": "auto"}).size == "auto"
    assert from_dict(_Outer, {"size": 4}).size == 4
    assert from_dict(_Outer, {"ratio": "1e-1"}).ratio == 0.1
    assert from_dict(_Outer, {"ratio": [1, "2"]}).ratio == [1.0, 2.0]
    assert from_dict(_Outer, {"inner": {"width": 1e1}}).inner == _Inner(10)
    assert from_dict(_Outer, {"table": {"a": {"width": 2}}}).table == {"a": _Inner(2)}
    with pytest.raises(ConfigError, match=r"^ratio does not fit any of its types: ratio must be a number, got 'x'; "
                                          r"ratio must be a list"):
        from_dict(_Outer, {"ratio": "x"})
    with pytest.raises(ConfigError, match=r"^unknown config key table\.a\.widht; did you mean table\.a\.width\?$"):
        from_dict(_Outer, {"table": {"a": {"widht": 2}}})


@pytest.mark.parametrize("override,suggestion", [
    ("train.lr=1", "optimizer.lr"),                        # the same key in another section
    ("train.micro_batch=2", "train.micro_batch_size"),     # a close key of the same section
    ("optimiser.lr=1", "optimizer"),                       # a misspelt section
    ("parallel.tensor_paralel=2", "parallel.tensor_parallel"),
    ("model.overrides.hiden_size=3", "model.overrides.hidden_size"),
    ("checkpoint.keep=3", "checkpoint.keep_last"),
    ("embedding.temprature=0.1", "embedding.temperature"),
])
def test_unknown_keys_name_the_path_and_suggest_the_closest(override, suggestion):
    key = override.split("=")[0].split(".")
    message = _refused(override)
    assert message.startswith("unknown config key ") and f"did you mean {suggestion}?" in message, message
    assert message.split(";")[0].endswith(".".join(key if key[0] != "optimiser" else key[:1]))


def _refused_pretrain(*overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        load_run_config("pretrain", os.path.join(REPO, "examples", "tiny", "pretrain.yaml"), list(overrides))
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_keys_inside_list_items_and_blends_are_checked_at_load():
    message = _refused_pretrain("data.kind=blended", "data.blend={sources: [{prefix: x, wieght: 2}]}")
    assert message == "unknown config key data.blend.sources[0].wieght; did you mean data.blend.sources[0].weight?"
    assert _refused_pretrain("data.kind=blended") == "data.blend is required for data.kind=blended"
    assert _refused_pretrain("data.kind=blended", "data.blend={}") == "data.blend.sources is required"
    assert _refused_pretrain("data.kind=blended", "data.blend={sources: [{prefix: x, weight: 0}]}") == \
        "data.blend.sources[0].weight must be > 0, got 0"
    assert _refused_pretrain("data.kind=blended", "data.blend={sources: []}") == \
        "data.blend.sources must have at least 1 items, got 0"


def test_each_stage_takes_its_own_data_kinds_and_sections():
    assert _refused_pretrain("data.kind=contrastive") == \
        "data.kind must be one of 'blended', 'sft', 'synthetic', got 'contrastive'"
    assert _refused_pretrain("data.kind=sft", "data.contrastive_prefix=x").startswith(
        "unknown config key data.contrastive_prefix")
    assert _refused_pretrain("data.sft_prefix=x") == "unknown config key data.sft_prefix for data.kind=synthetic"
    assert _refused_pretrain("embedding.temperature=0.1").startswith("unknown config key embedding")
    assert _refused("data.kind=blended") == "data.kind must be one of 'contrastive', got 'blended'"
    assert load_run_config("sft", None, ["data.kind=sft", "data.sft_prefix=p"]).data.sft_prefix == "p"
    assert load_run_config("pretrain", None, []).data.kind == "synthetic"  # no kind: synthetic
    assert load_run_config("embed-sup", None, ["data.contrastive_prefix=p"]).data.kind == "contrastive"


@pytest.mark.parametrize("override,field", [
    ("optimizer.warmup_fraction=1.5", "optimizer.warmup_fraction"), ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.train_steps=-1", "train.train_steps"), ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
    ("optimizer.adam_beta2=1", "optimizer.adam_beta2"), ("train.precision=fp8", "train.precision"),
    ("model.overrides.hidden_size=0", "model.overrides.hidden_size"), ("parallel.tensor_parallel=0", "parallel.tensor_parallel"),
])
def test_values_out_of_range_are_refused_naming_the_dotted_field(override, field):
    message = _refused(override)
    assert field in message, message


def test_malformed_overrides_are_one_line_errors():
    assert _refused("train.train_steps") == "override 'train.train_steps' must look like key.path=value"
    assert _refused("optimizer.lr=[1,") == "override optimizer.lr: the value '[1,' is not valid YAML"
    assert _refused("train..lr=1").startswith("override 'train..lr=1': 'train..lr' is not a dotted key")


def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- train\n- model\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: a recipe is a YAML mapping of sections"):
        load_run_config("pretrain", str(recipe))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: os.path.relpath(path, REPO))
def test_every_shipped_recipe_loads(recipe):
    cfg = load_run_config(_stage_of(recipe), recipe)
    assert type(cfg) is STAGE_CONFIGS[_stage_of(recipe)]
    cfg.model.build()


def _check_example(key: str, value: str) -> None:
    """`key` names a field of RunConfig (or of the model, under model.overrides) and `value` converts to
    its type; the rest of the config may still need other keys (data.kind=blended needs a blend)."""
    owner = EmbeddingConfig if key.split(".")[0] != "data" or key.split(".")[-1] == "contrastive_prefix" \
        else LanguageModelConfig
    annotation, parts = owner, key.split(".")
    if parts[:2] == ["model", "overrides"] and len(parts) == 3:
        owner, parts = ConanModelConfig, parts[2:]
    for part in parts:
        types = typing.get_type_hints(owner)
        assert part in {f.name for f in dataclasses.fields(owner)}, f"example {key}={value}: no such key"
        annotation = types[part]
        variants = [arg for arg in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(arg)]
        owner = next((v for v in variants if len(parts) > 1 and parts[-1] in {f.name for f in dataclasses.fields(v)}),
                     variants[0] if variants else None)
        if owner is None:
            break
    convert(yaml.safe_load(value), annotation, key)


_EXAMPLE = re.compile(r"(?<![\w./-])((?:[a-z_]+\.)+[a-z_]+)=([^\s`'\",)]+)")


def _stage_entry_modules() -> List[str]:
    paths = glob.glob(os.path.join(REPO, "megatron_conan", "training", "*.py"))
    return sorted(f"megatron_conan.training.{os.path.basename(path)[:-3]}" for path in paths
                  if "return run_stage(" in open(path, encoding="utf-8").read())


def test_the_stage_entry_points_are_found():
    assert {"megatron_conan.training.pretrain", "megatron_conan.training.sft"} <= set(_stage_entry_modules())


@pytest.mark.parametrize("module", _stage_entry_modules())
def test_every_example_in_a_stage_help_text_is_a_valid_key(module, capsys):
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main(["--help"])
    assert exited.value.code == 0
    examples = _EXAMPLE.findall(capsys.readouterr().out)
    assert examples, f"{module} --help shows no override example"
    for key, value in examples:
        _check_example(key, value)


def test_every_override_example_in_the_readmes_and_recipes_is_a_valid_key():
    sections = {field.name for cls in (EmbeddingConfig, LanguageModelConfig) for field in dataclasses.fields(cls)}
    texts = [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "examples", "**", "*"), recursive=True)]
    checked = 0
    for path in texts:
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            for key, value in _EXAMPLE.findall(handle.read()):
                if key.split(".")[0] in sections:
                    _check_example(key, value if value != "..." else "x")
                    checked += 1
    assert checked >= 5


def test_the_example_check_refuses_bad_examples():
    _check_example("model.overrides.vocab_size", "32000")
    for key, value in (("train.lr", "1"), ("model.overrides.hiden_size", "3")):
        with pytest.raises(AssertionError, match="no such key"):
            _check_example(key, value)
    with pytest.raises(ConfigError, match="train.train_steps must be an integer"):
        _check_example("train.train_steps", "many")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: os.path.relpath(path, REPO))
def test_a_written_config_loads_back_unchanged(recipe, tmp_path):
    stage = _stage_of(recipe)
    cfg = load_run_config(stage, recipe, ["optimizer.lr=3e-4", "train.token_budget=3e12", "run_dir=2024"])
    dump_config(cfg, str(tmp_path / "config.yaml"))
    assert load_run_config(stage, str(tmp_path / "config.yaml")) == cfg


def test_the_soft_mask_overlay_is_checked_when_the_config_loads():
    soft_mask = _load("model.soft_mask={schedule: quadratic, total_steps: 1e3}").model.soft_mask
    assert soft_mask == {"schedule": "quadratic", "total_steps": 1000}  # the keys set: laid over the stage's default
    assert type(soft_mask["total_steps"]) is int
    assert _refused("model.soft_mask={schedul: linear}") == \
        "unknown config key model.soft_mask.schedul; did you mean model.soft_mask.schedule?"
    assert _refused("model.soft_mask={total_steps: many}") == "model.soft_mask.total_steps must be an integer, got 'many'"
    assert "SoftMaskConfig.fixed_a must be None or in [0, 1]" in _refused("model.soft_mask={fixed_a: 2}")
