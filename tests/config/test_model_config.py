import pytest

from megatron_conan.config.model import (
    ConanModelConfig,
    ConfigError,
    ParallelConfig,
    conan_1p4b,
    model_recipe,
    tiny,
)
from megatron_conan.models.transformer_config import build_transformer_config


def test_conan_1p4b_closed_form_count_is_the_papers_1503m():
    count = conan_1p4b().num_parameters()
    assert abs(count - 1_503e6) / 1_503e6 < 0.005, count


def test_conan_1p4b_shape():
    cfg = conan_1p4b()
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (8, 3584, 32, 8)
    assert (cfg.head_dim, cfg.ffn_hidden_size, cfg.max_sequence_length) == (112, 8192, 32768)
    assert cfg.vocab_size == 150_000 and cfg.padded_vocab_size(1) % 128 == 0
    assert cfg.padded_vocab_size(4) % (128 * 4) == 0 and cfg.padded_vocab_size(4) >= 150_000
    assert cfg.tie_embeddings and cfg.rotary_base == 1e6


def test_model_recipe_lookup():
    assert model_recipe("tiny") == tiny()
    with pytest.raises(ConfigError, match="unknown model recipe"):
        model_recipe("gpt5")


@pytest.mark.parametrize(
    "model_kwargs, parallel, field",
    [
        (dict(), ParallelConfig(tensor_parallel=16), "num_attention_heads"),
        (dict(num_attention_heads=8, num_query_groups=2), ParallelConfig(tensor_parallel=4), "num_query_groups"),
        (dict(num_layers=3), ParallelConfig(pipeline_parallel=2), "num_layers"),
    ],
)
def test_layout_errors_name_the_field(model_kwargs, parallel, field):
    cfg = tiny()
    for key, value in model_kwargs.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=field):
        parallel.validate_for_model(cfg)
    with pytest.raises(ConfigError, match=field):
        build_transformer_config(cfg, parallel)


def test_world_size_not_divisible_by_model_parallel():
    with pytest.raises(ConfigError, match=r"world size 6 .*tensor_parallel \* .*pipeline_parallel"):
        ParallelConfig(tensor_parallel=2, pipeline_parallel=2).data_parallel(6)
    assert ParallelConfig(tensor_parallel=2, pipeline_parallel=2).data_parallel(8) == 2


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ConfigError, match="hidden_size"):
        ConanModelConfig(num_layers=2, hidden_size=100, num_attention_heads=8, num_query_groups=4,
                         ffn_hidden_size=64, vocab_size=128, max_sequence_length=64)


def test_heads_not_divisible_by_kv_groups():
    with pytest.raises(ConfigError, match="num_query_groups"):
        ConanModelConfig(num_layers=2, hidden_size=96, num_attention_heads=12, num_query_groups=5,
                         ffn_hidden_size=64, vocab_size=128, max_sequence_length=64)


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(ConfigError, match="sequence_parallel"):
        ParallelConfig(sequence_parallel=True)


def test_unknown_transformer_override_is_named():
    with pytest.raises(ConfigError, match="not_a_field"):
        build_transformer_config(tiny(), ParallelConfig(), transformer_overrides={"not_a_field": 1})



def test_virtual_pipeline_needs_a_pipeline():
    with pytest.raises(ConfigError, match="virtual_pipeline_parallel"):
        ParallelConfig(pipeline_parallel=1, virtual_pipeline_parallel=2)


def test_forcing_transformer_engine_without_it_is_one_clear_error():
    import pytest

    from megatron_conan.config.loader import from_dict
    from megatron_conan.errors import ConfigError
    from megatron_conan.ops.engines import transformer_engine_available
    from megatron_conan.config.run import LanguageModelConfig

    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ConfigError, match="model.transformer_engine=true: Transformer Engine is not installed"):
        from_dict(LanguageModelConfig, {"run_dir": "x", "model": {"transformer_engine": True}, "data": {"kind": "synthetic"}})
    assert from_dict(LanguageModelConfig, {"run_dir": "x", "model": {"transformer_engine": False},
                                 "data": {"kind": "synthetic"}}).model.transformer_engine is False


def test_embedding_init_std_reaches_megatron_and_defaults_to_the_weights_std():
    import dataclasses

    import torch

    default = build_transformer_config(tiny(), ParallelConfig())
    assert default.embedding_init_method_std == default.init_method_std == tiny().init_method_std
    config = build_transformer_config(dataclasses.replace(tiny(), embedding_init_method_std=0.3), ParallelConfig())
    assert config.embedding_init_method_std == 0.3 and config.init_method_std == 0.02
    weights = torch.empty(512, 256)
    torch.manual_seed(0)
    config.embedding_init_method(weights)
    assert abs(weights.std().item() - 0.3) < 0.01
    config.init_method(weights)
    assert abs(weights.std().item() - 0.02) < 0.001
