"""The local spec's linear and MLP layers (models/local_layers.py) compute exactly what megatron-core's
do, forward and backward, with gradients on and off, and the local spec builds them. One spawned
single-process world (megatron-core's layers read its model-parallel groups) runs every check."""

import torch

from megatron_conan.distributed.spawn import run_distributed

MLP_CASES = {"swiglu": {}, "offset falls back": {"glu_linear_offset": 0.5}, "bias": {"add_bias_linear": True}}


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=24, gated_linear_unit=True,
                  activation_func=torch.nn.functional.silu, add_bias_linear=False, bias_activation_fusion=False,
                  use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _forward_backward(mlp, x):
    x = x.clone().requires_grad_(True)
    out, bias = mlp(x)
    out = out if bias is None else out + bias  # fc2's bias comes back unadded (skip_bias_add)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for _, p in sorted(mlp.named_parameters())]


def _mlp_matches(overrides) -> dict:
    """Ours against megatron-core's MLP on the same weights: outputs and every gradient."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    from megatron_conan.models.local_layers import ConanColumnParallelLinear, ConanMLP, ConanRowParallelLinear

    config = _config(**overrides)
    theirs = MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                 ffn_hidden_size=config.ffn_hidden_size)
    ours = ConanMLP(config, MLPSubmodules(linear_fc1=ConanColumnParallelLinear, linear_fc2=ConanRowParallelLinear),
                    ffn_hidden_size=config.ffn_hidden_size)
    if config.add_bias_linear:  # megatron-core zero-initialises biases: give them values
        with torch.no_grad():
            theirs.linear_fc1.bias.copy_(torch.linspace(-1, 1, theirs.linear_fc1.bias.numel()))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 3, 16)
    expected, got = _forward_backward(theirs, x), _forward_backward(ours, x)
    with torch.no_grad():
        no_grad = sum(part for part in ours(x) if part is not None)
    return {"same keys": set(ours.state_dict()) == set(theirs.state_dict()),
            "equal": len(expected) == len(got) and all(torch.equal(a, b) for a, b in zip(expected, got)),
            "no grad equal": torch.equal(no_grad, expected[0])}


def _function_calls() -> dict:
    """How often megatron-core's linear Function runs for a column + row pair, with and without
    gradients, and whether the two products agree bit for bit."""
    from megatron.core.tensor_parallel import layers

    from megatron_conan.models.local_layers import ConanColumnParallelLinear, ConanRowParallelLinear

    config = _config()
    column = ConanColumnParallelLinear(16, 24, config=config, init_method=config.init_method, bias=False,
                                       gather_output=False)
    row = ConanRowParallelLinear(24, 16, config=config, init_method=config.init_method, bias=False,
                                 input_is_parallel=True, skip_bias_add=True)
    x = torch.randn(7, 2, 16)
    calls = []
    original = layers.LinearWithGradAccumulationAndAsyncCommunication.apply
    layers.LinearWithGradAccumulationAndAsyncCommunication.apply = lambda *args: calls.append(1) or original(*args)
    try:
        with_grad = row(column(x)[0])[0]
        with torch.no_grad():
            calls_before = len(calls)
            without = row(column(x)[0])[0]
    finally:
        layers.LinearWithGradAccumulationAndAsyncCommunication.apply = original
    return {"with grad": calls_before, "without": len(calls) - calls_before,
            "equal": torch.equal(with_grad.detach(), without)}


def _spec_modules() -> list:
    from megatron_conan.models.conan import conan_block_spec

    layer = conan_block_spec(_config(), use_transformer_engine=False).submodules.layer_specs[0].submodules
    attention = layer.self_attention.submodules
    mlp = layer.mlp(_config())  # as megatron-core's layer builds it: the class with the config
    return [type(module).__name__ if isinstance(module, torch.nn.Module) else module.__name__
            for module in (attention.linear_qkv, attention.linear_proj, mlp, mlp.linear_fc1, mlp.linear_fc2)]


def _built_model() -> dict:
    """A tiny model built from the local spec: its MLP class and megatron-core's warnings on the way."""
    import logging

    from megatron_conan.config.model import ParallelConfig, tiny
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.models.transformer_config import build_transformer_config

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    megatron = logging.getLogger("megatron")
    megatron.addHandler(handler)
    try:
        (model,) = build_model_chunks(tiny(), build_transformer_config(tiny(), ParallelConfig()),
                                      use_transformer_engine=False)
    finally:
        megatron.removeHandler(handler)
    return {"mlp": sorted({type(layer.mlp).__name__ for layer in model.decoder.layers}),
            "warnings": [record.getMessage() for record in records]}


def _body(rank, world_size):
    from megatron_conan.config.model import ParallelConfig
    from megatron_conan.distributed.parallel import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1234)
    return {"mlp": {name: _mlp_matches(overrides) for name, overrides in MLP_CASES.items()},
            "function calls": _function_calls(), "spec": _spec_modules(), "model": _built_model()}


def test_local_layers_equal_megatron_cores_and_the_spec_uses_them():
    result = run_distributed(_body, 1)[0]
    for name, checks in result["mlp"].items():
        assert checks == {"same keys": True, "equal": True, "no grad equal": True}, name
    assert result["function calls"] == {"with grad": 2, "without": 0, "equal": True}
    assert result["spec"] == ["ConanColumnParallelLinear", "ConanRowParallelLinear", "ConanMLP",
                              "ConanColumnParallelLinear", "ConanRowParallelLinear"]
    assert result["model"] == {"mlp": ["ConanMLP"], "warnings": []}
