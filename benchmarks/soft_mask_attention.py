"""Soft-mask attention: our kernels against the ways PyTorch can express it (docs/GPU.md, part `kernel_speed`).

For each length and a, forward and forward+backward wall time and TFLOP/s of:
  triton, cuda        our fused kernels (block skipping), when available for the device
  reference           our PyTorch specification (CPU only: it materialises [b, h, s, s])
  sdpa_causal         SDPA, causal (the a = 0 cost floor; ignores a and padding)
  sdpa_full           SDPA, no mask (the a = 1 cost)
  flex                FlexAttention with a score_mod adding log m_i above the diagonal (compiled on
                      GPU; eager and forward-only on CPU, where its backward is not implemented)
  sdpa_float_mask     SDPA with the materialised float mask log M [b, 1, s, s]
  identity            the two-call identity: causal + full attention with LSE, then the combination
                      (backward time with the LSE treated as constant: a lower bound)

TFLOP/s count the FLOPs of the work actually needed, the same for every method of a row: per head,
4 * d * (visible (i, j) pairs) forward, 2.5x that backward (flash-attention convention), where row i
sees its causal keys and, when m_i > 0, its future keys up to the true length.

    python benchmarks/soft_mask_attention.py                      # CPU defaults: tiny, < 30 s
    python benchmarks/soft_mask_attention.py --device cuda        # 1k-16k, 32/8 heads, d 112, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_conan.ops.soft_mask_attention.function import resolve_backend, soft_mask_attention
from megatron_conan.ops.soft_mask_attention.reference import soft_mask_attention_reference, soft_mask_log_weights
from megatron_conan.ops.soft_mask_attention.schedule import row_mask_weights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METHODS = ("triton", "cuda", "reference", "sdpa_causal", "sdpa_full", "flex", "sdpa_float_mask",
           "identity")


class Unavailable(Exception):
    """A method cannot run in this setting; the message is printed as the reason."""


def needed_flops(m: torch.Tensor, lengths: torch.Tensor, heads: int, head_dim: int) -> float:
    """Forward FLOPs of the visible (i, j) pairs (see module doc)."""
    pairs = 0
    for row_weights, length in zip(m.cpu(), lengths.cpu().tolist()):
        rows = torch.arange(length)
        future = (length - 1 - rows) * (row_weights[:length] > 0)
        pairs += int((rows + 1).sum() + future.sum())
    return 4.0 * head_dim * pairs * heads


def _flex_fn(device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cuda":
        return torch.compile(flex_attention, dynamic=False)

    def eager(*args, **kwargs):  # unfused; warns that it should be compiled, which we know
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(*args, **kwargs)
    return eager


def build_method(name: str, q, k, v, m, lengths, device) -> Callable[[], torch.Tensor]:
    """A closure computing the attention output [b, hq, s, d] with `name`, or Unavailable."""
    s = q.shape[2]
    if name in ("triton", "cuda"):
        try:
            resolve_backend(name, device)
        except (RuntimeError, ValueError) as error:
            if name == "triton" and device.type == "cpu":
                raise Unavailable("CPU needs TRITON_INTERPRET=1") from error
            raise Unavailable("not built" if device.type == "cuda" else "needs CUDA") from error
        if name == "triton" and device.type == "cpu" and s > 256:
            raise Unavailable("interpret mode: too slow above s=256")
        return lambda: soft_mask_attention(q, k, v, m, lengths, backend=name)
    if name == "reference":
        if device.type != "cpu":
            raise Unavailable("materialises [b, h, s, s]; CPU only")
        return lambda: soft_mask_attention_reference(q, k, v, m, lengths)
    if name == "sdpa_causal":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if name == "sdpa_full":
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if name == "sdpa_float_mask":
        bias = soft_mask_log_weights(m, lengths, s, q.dtype)  # [b, 1, s, s]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    if name == "flex":
        log_m = torch.log(m)  # [b, s], -inf where m = 0
        lengths_long = lengths.long()

        def score_mod(score, b, h, q_idx, kv_idx):
            soft = torch.where(kv_idx > q_idx, log_m[b, q_idx], 0.0)
            return torch.where(kv_idx < lengths_long[b], score + soft, -float("inf"))

        flex = _flex_fn(device)
        return lambda: flex(q, k, v, score_mod=score_mod, enable_gqa=True)
    if name == "identity":
        return _identity_method(q, k, v, m, device)
    raise ValueError(name)


def _identity_method(q, k, v, m, device):
    """Causal and full attention with their LSE (flash kernels), combined per row."""
    rep = q.shape[1] // k.shape[1]
    if device.type == "cuda":
        def attend(causal):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal)[:2]
            return out, lse
    else:
        def attend(causal):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal)

    weight = m.view(m.shape[0], 1, m.shape[1], 1)  # [b, 1, s, 1]

    def run():
        out_c, lse_c = attend(True)
        out_f, lse_f = attend(False)
        lse_c = lse_c.detach().float().unsqueeze(-1)
        lse_f = lse_f.detach().float().unsqueeze(-1)
        top = torch.maximum(lse_c, lse_f)
        w_c = (1 - weight) * torch.exp(lse_c - top)
        w_f = weight * torch.exp(lse_f - top)
        return ((w_c * out_c + w_f * out_f) / (w_c + w_f)).to(q.dtype)
    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device, warmup: int, repeats: int) -> float:
    """Median seconds of `fn`."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name, q, k, v, m, lengths, grad, device, warmup, repeats) -> Dict[str, object]:
    """{"fwd": seconds or reason, "fwd_bwd": seconds or reason}."""
    result: Dict[str, object] = {}
    try:
        forward = build_method(name, q, k, v, m, lengths, device)
        with torch.no_grad():
            result["fwd"] = time_call(forward, device, warmup, repeats)
    except Unavailable as reason:
        return {"fwd": f"n/a ({reason})", "fwd_bwd": f"n/a ({reason})"}
    except Exception as error:  # noqa: BLE001 - a failing baseline is reported, not fatal
        reason = _failure(error)
        return {"fwd": reason, "fwd_bwd": reason}
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    try:
        step = build_method(name, *leaves, m, lengths, device)

        def forward_backward():
            for leaf in leaves:
                leaf.grad = None
            step().backward(grad)
        result["fwd_bwd"] = time_call(forward_backward, device, warmup, repeats)
    except Exception as error:  # noqa: BLE001
        result["fwd_bwd"] = _failure(error)
    return result


def _failure(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"n/a ({type(error).__name__}: {text[:28]})"


def _cell(value, flops) -> str:
    if isinstance(value, str):
        return value
    return f"{value * 1e3:10.3f} ms {flops / value / 1e12:8.4f} TF/s"


def run(args) -> List[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    rows = []
    print(f"# soft-mask attention benchmark: device={device} dtype={args.dtype} batch={args.batch} "
          f"heads={args.heads}/{args.kv_heads} head_dim={args.head_dim} "
          f"position_scale={args.position_scale} torch={torch.__version__}; TFLOP/s of the needed "
          "work; identity backward treats its LSEs as constants (a lower bound)")
    print(f"{'seq':>6} {'a':>5} {'method':<16} {'forward':>28} {'forward+backward':>28}")
    for seq in args.lengths:
        g = torch.Generator().manual_seed(seq)
        shape_q = (args.batch, args.heads, seq, args.head_dim)
        shape_kv = (args.batch, args.kv_heads, seq, args.head_dim)
        q = torch.randn(shape_q, generator=g).to(device, dtype)
        k = torch.randn(shape_kv, generator=g).to(device, dtype)
        v = torch.randn(shape_kv, generator=g).to(device, dtype)
        grad = torch.randn(shape_q, generator=g).to(device, dtype)
        lengths = torch.full((args.batch,), seq, dtype=torch.int32, device=device)
        for a in args.a:
            m = row_mask_weights(a, lengths, seq, args.position_scale)
            flops = needed_flops(m, lengths, args.heads, args.head_dim)
            for name in args.methods:
                result = measure(name, q, k, v, m, lengths, grad, device, args.warmup, args.repeats)
                print(f"{seq:>6} {a:>5} {name:<16} {_cell(result['fwd'], flops):>28} "
                      f"{_cell(result['fwd_bwd'], 3.5 * flops):>28}", flush=True)
                rows.append({"seq": seq, "a": a, "method": name, **result,
                             "fwd_flops": flops, "fwd_bwd_flops": 3.5 * flops})
    return rows


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="default 1024 2048 4096 8192 16384 on GPU, 64 128 on CPU")
    parser.add_argument("--a", type=float, nargs="+", default=[0.0, 0.1, 0.5, 1.0])
    parser.add_argument("--position-scale", default="len_over_pos",
                        choices=("len_over_pos", "pos_over_len", "none"))
    parser.add_argument("--batch", type=int, default=None, help="default 2 on GPU, 1 on CPU")
    parser.add_argument("--heads", type=int, default=None, help="default 32 on GPU, 4 on CPU")
    parser.add_argument("--kv-heads", type=int, default=None, help="default 8 on GPU, 1 on CPU")
    parser.add_argument("--head-dim", type=int, default=112)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--warmup", type=int, default=None, help="default 3 on GPU, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 on GPU, 2 on CPU")
    parser.add_argument("--output-json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    defaults = dict(dtype="bf16" if gpu else "fp32", batch=2 if gpu else 1,
                    heads=32 if gpu else 4, kv_heads=8 if gpu else 1, warmup=3 if gpu else 1,
                    repeats=10 if gpu else 2,
                    lengths=[1024, 2048, 4096, 8192, 16384] if gpu else [64, 128])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    return args


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    rows = run(args)
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
