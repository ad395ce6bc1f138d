"""Packed rows give the padded embeddings and gradients: a in {0, 0.5, 1}, mean (with an instruction
left out) and last pooling, at TP=1, TP=2 and TP=2 with sequence parallelism, with the rows attended
row by row and text by text (SDPA's buckets, ops/soft_mask_attention/text_buckets.py)."""

import torch

from megatron_conan.models.packing import first_fit_rows, pack_batch
from megatron_conan.testing.distributed import run_distributed

TOL = 1e-5
# a text of one token, a text exactly filling a row (32), ragged rest
LENGTHS = (24, 1, 15, 7, 32, 3, 9)
STARTS = (4, 0, 2, 0, 5, 1, 0)
ROW = 32
A_VALUES = (0.0, 0.5, 1.0)


def test_first_fit_rows_respect_the_budget_and_keep_every_text():
    rows = first_fit_rows(LENGTHS, ROW)
    assert sorted(i for row in rows for i in row) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in row) <= ROW for row in rows)
    assert len(rows) == -(-sum(LENGTHS) // ROW)  # these lengths fit without waste beyond the last row
    assert first_fit_rows([40, 3], 32) == [[0], [1]]  # a text over the budget gets its own row


def test_pack_batch_lays_texts_back_to_back_with_restarting_positions():
    ids = torch.arange(1, 1 + len(LENGTHS) * ROW).view(len(LENGTHS), ROW)
    lengths = torch.tensor(LENGTHS)
    packed = pack_batch(ids, lengths, ROW)
    flat = packed.input_ids[0]
    for i, length in enumerate(LENGTHS):
        index = packed.token_index[:length, i]
        assert torch.equal(flat[index], ids[i, :length])
        assert torch.equal(packed.position_ids[0, index], torch.arange(length))
    assert packed.padding_tokens == packed.input_ids.numel() - sum(LENGTHS)
    assert packed.params.row_width == ROW and packed.params.qkv_format == "sbhd"


def test_rows_narrow_to_the_fullest_row():
    # a batch smaller than one row (a GradCache chunk of short queries) is one row of its own tokens,
    # rounded up to the multiple sequence parallelism needs; texts still never share a row past the budget
    ids = torch.ones(3, 8, dtype=torch.long)
    assert pack_batch(ids, torch.tensor([5, 8, 2]), 512).params.row_width == 15
    assert pack_batch(ids, torch.tensor([5, 8, 2]), 512, multiple_of=4).params.row_width == 16
    wide = pack_batch(ids, torch.tensor([5, 8, 2]), 10)
    assert wide.params.row_width == 10 and wide.padding_tokens == 5  # rows [8, 2] and [5]


def test_text_buckets_group_like_lengths_and_pay_off_only_against_wide_rows():
    from megatron_conan.ops.soft_mask_attention.text_buckets import bucket_bounds, plan_text_buckets

    assert bucket_bounds([512, 400, 383, 300, 40, 33, 20, 1]) == [(0, 2), (2, 4), (4, 6), (6, 8)]  # 20 and 1: short
    assert bucket_bounds([]) == []
    # sixteen 20-token queries in one row of 320: 16 x 400 against 320^2
    cu = torch.arange(0, 321, 20, dtype=torch.int32)
    plan = plan_text_buckets(cu, cu, 1, 320)
    assert [tuple(b.token.shape) for b in plan.buckets] == [(16, 20)]
    assert torch.equal(plan.positions, torch.arange(320))
    # one text filling its row: the row is already the cheapest
    full = torch.tensor([0, 320], dtype=torch.int32)
    assert plan_text_buckets(full, full, 1, 320) is None


def _grads(model):
    import torch.distributed as dist
    from megatron.core import parallel_state

    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        if getattr(param, "sequence_parallel", False):
            # each TP rank holds the gradient of its own sequence slice, and the slices differ
            # between the padded and the packed layout: compare the sums
            dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        grads[name] = grad
        param.grad = None
    return grads


def _body(rank, world_size, layouts):
    from megatron_conan.config.model import ParallelConfig, tiny
    from megatron_conan.models.transformer_config import build_transformer_config
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.models.embedder import embed
    from megatron_conan.ops.soft_mask_attention import SoftMaskConfig, text_buckets
    from megatron_conan.ops.soft_mask_attention.core_attention import (
        set_soft_mask_step, soft_mask_core_attention_spec)

    g = torch.Generator().manual_seed(3)
    model_config = tiny()
    ids = torch.randint(1, model_config.vocab_size, (len(LENGTHS), max(LENGTHS)), generator=g)
    lengths, starts = torch.tensor(LENGTHS), torch.tensor(STARTS)
    weights = torch.randn(len(LENGTHS), model_config.hidden_size, generator=g)
    worst = {}
    for tp, sp, cases in layouts:
        parallel = ParallelConfig(tensor_parallel=tp, sequence_parallel=sp)
        initialize_model_parallel(parallel, seed=1234)
        spec = soft_mask_core_attention_spec(SoftMaskConfig(total_steps=100, backend="sdpa"))
        (model,) = build_model_chunks(model_config, build_transformer_config(model_config, parallel),
                                      core_attention=spec, use_transformer_engine=False)
        for a, pooling in cases:
            set_soft_mask_step(model, round(100 * a))
            results = []
            # padded; packed, attended row by row; packed, attended text by text (SDPA's buckets)
            for row, gain in ((0, 0.0), (ROW, 0.0), (ROW, float("inf"))):
                text_buckets.GAIN = gain
                emb = embed(model, ids, lengths, pooling, starts=starts if pooling == "mean" else None,
                            max_tokens_per_row=row)
                (emb * weights).sum().backward()
                results.append((emb.detach(), _grads(model)))
            (padded, padded_grads), *packed_layouts = results
            for layout, (packed, packed_grads) in zip(("rows", "texts"), packed_layouts):
                worst[(tp, sp, a, pooling, layout)] = (
                    float((padded - packed).abs().max()),
                    max(float((padded_grads[k] - packed_grads[k]).abs().max()) for k in padded_grads),
                    float(padded.std()))
    return worst


def _bias_count_body(rank, world_size):
    from megatron_conan.config.model import ParallelConfig, tiny
    from megatron_conan.models.transformer_config import build_transformer_config
    from megatron_conan.distributed.parallel import initialize_model_parallel
    from megatron_conan.models.conan import build_model_chunks
    from megatron_conan.models.embedder import embed
    from megatron_conan.ops.soft_mask_attention import SoftMaskConfig, reference, text_buckets
    from megatron_conan.ops.soft_mask_attention.core_attention import soft_mask_core_attention_spec

    model_config = tiny()
    initialize_model_parallel(ParallelConfig(), seed=1234)
    spec = soft_mask_core_attention_spec(SoftMaskConfig(total_steps=100, backend="sdpa"))
    (model,) = build_model_chunks(model_config, build_transformer_config(model_config, ParallelConfig()),
                                  core_attention=spec, use_transformer_engine=False)
    text_buckets.GAIN = float("inf")
    built = []
    original = reference.soft_mask_log_weights
    reference.soft_mask_log_weights = lambda *args, **kwargs: built.append(args[2]) or original(*args, **kwargs)
    lengths = [60, 50, 20, 12, 5]  # buckets 60 50 | 20 12 5
    ids = torch.randint(1, model_config.vocab_size, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(0))
    embed(model, ids, torch.tensor(lengths), "mean", max_tokens_per_row=64)
    bounds = text_buckets.bucket_bounds(lengths)
    texts_built = list(built)
    text_buckets.GAIN = 0.0  # the same texts attended row by row: one mask for all rows, built once
    built.clear()
    embed(model, ids, torch.tensor(lengths), "mean", max_tokens_per_row=64)
    return {"built": texts_built, "rows_built": list(built), "buckets": [lengths[start] for start, _ in bounds],
            "layers": model_config.num_layers}


def test_text_buckets_build_each_mask_once_per_forward():
    """Every layer of a packed forward attends the same buckets (or rows): each mask is built by the
    first layer and reused by the others."""
    result = run_distributed(_bias_count_body, 1)[0]
    assert result["layers"] > 1 and len(result["buckets"]) > 1
    assert sorted(result["built"]) == sorted(result["buckets"])  # one mask per bucket, its width
    assert len(result["rows_built"]) == 1  # packed rows: one mask for all rows, not one per layer


def _check(worst):
    for case, (emb_diff, grad_diff, spread) in worst.items():
        assert spread > 0.01, case  # the embeddings are not degenerate
        assert emb_diff < TOL and grad_diff < TOL, (case, emb_diff, grad_diff)


def test_packed_equals_padded_single_process():
    cases = [(a, pooling) for a in A_VALUES for pooling in ("mean", "last")]
    _check(run_distributed(_body, 1, args=([(1, False, cases)],))[0])


def test_packed_equals_padded_tp2_and_sequence_parallel():
    layouts = [(2, False, [(0.5, "mean"), (1.0, "last")]), (2, True, [(0.5, "mean"), (0.0, "last")])]
    for worst in run_distributed(_body, 2, args=(layouts,)):
        _check(worst)
