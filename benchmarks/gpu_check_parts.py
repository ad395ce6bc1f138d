"""The parts of the GPU check (benchmarks/gpu_check.py), one per child process:

    python -m benchmarks.gpu_check_parts <part> --out result.json --scratch DIR [--cpu]

Each part writes {"status": "ran" | "failed", "figures": {...}, ...} to --out. GPU shapes are the
1.4B model's (seq 4096, head dim 112); --cpu runs the same code at tiny shapes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Dict, List

STARTED = time.monotonic()  # the part's share counts from its process's start


def _device(cpu: bool):
    import torch

    return torch.device("cpu" if cpu else "cuda", None if cpu else torch.cuda.current_device())


# -- part 0: every stage on one device ------------------------------------------------------------

def part_stages(cpu: bool, scratch: str, out: str, seconds: float) -> Dict:
    """The main job's pipeline (megatron_conan.jobs) at a plan smaller than its quick one, on one rank (NCCL on a GPU).
    The figures so far are written after every step: a part stopped at its share keeps them."""
    import dataclasses

    from megatron_conan.eval.stages import score
    from megatron_conan.jobs.pipeline import STEPS, Pipeline
    from megatron_conan.jobs.plan import PLANS
    from megatron_conan.jobs.workspace import claim_work_dir

    plan = dataclasses.replace(PLANS["quick"], pretrain_steps=3, sft_steps=2, weak_steps=2, sup_steps=2)
    problem = claim_work_dir(scratch)
    if problem:
        raise RuntimeError(problem)
    pipeline = Pipeline(scratch, plan)
    pipeline.gpus = 1  # one device: a single rank, whatever the plan's layout
    figures = {}
    for name in STEPS[:-1]:  # all but the report's plots
        started = time.perf_counter()
        getattr(pipeline, name)()
        figures[f"{name.replace('_', '-')} s"] = round(time.perf_counter() - started, 1)  # step names as stage ids
        write_result(out, {"status": "partial", "figures": figures, "reason": f"stopped after {name}"})
    for stage, entry in pipeline.results["stages"].items():
        figures[f"{stage} loss"] = f"{entry['first_loss']:.3f} -> {entry['last_loss']:.3f} on {entry['device']}"
    final = next(row for row in pipeline.results["evaluation"]["rows"] if row["name"] == "4 embed-sup")
    figures["evaluate nDCG@10 (stage 4, validation)"] = round(score(final), 4)
    return {"status": "ran", "figures": figures}


# -- part 1: kernel correctness -------------------------------------------------------------------

def _cuda_extension(device, seconds_left: float):
    """('' when the CUDA extension loads and runs on this GPU, else why not; the build's figures).
    Builds it in the source tree for this GPU's architecture only, on every core, unless the last
    measured build does not fit `seconds_left` (cuda_build.py); a built module stays for later runs."""
    import torch

    from megatron_conan.ops.soft_mask_attention import cuda_binding, cuda_build

    if device.type != "cuda":
        return "no CUDA", {}
    capability = torch.cuda.get_device_capability(device)
    loaded = cuda_binding.is_available()
    if loaded and cuda_binding.runs_on(capability, cuda_binding.compiled_archs()):
        return "", {"cuda build": "kept from an earlier run"}
    arch = cuda_build.arch_for(capability)
    built = cuda_build.build(arch, torch.__version__, seconds_left)
    figures = {} if built.seconds is None else {f"cuda build sm_{arch} s": round(built.seconds, 1)}
    if built.reason:
        return built.reason, figures
    if loaded:  # a module once imported stays: the build for another GPU holds this process
        return f"rebuilt for sm_{arch}: the next run loads it", figures
    cuda_binding.load_extension.cache_clear()  # it remembered the failed import
    importlib.invalidate_caches()  # the import system's listing of the tree predates the new module
    if not (cuda_binding.is_available() and cuda_binding.runs_on(capability, cuda_binding.compiled_archs())):
        return f"built for sm_{arch} but it does not load or run here", figures
    return "", figures


def part_kernels(cpu: bool, scratch: str, out: str, seconds: float) -> Dict:
    """Triton and CUDA against the fp64 reference on right-padded rows and on packed rows (several
    texts per row, texts of length 1: a row exactly full and, at GPU shapes, a ragged one)."""
    import torch

    from megatron_conan.ops.soft_mask_attention.function import soft_mask_attention
    from megatron_conan.ops.soft_mask_attention.schedule import row_mask_weights, windowed_row_mask_weights
    from megatron_conan.testing.soft_mask import kernel_error, make_inputs, packed_windows, reference_with_grads

    device = _device(cpu)
    b, hq, hkv, s, d = (1, 2, 1, 48, 112) if cpu else (2, 32, 8, 1000, 112)
    lengths = torch.tensor([s, max(1, s * 2 // 3)][:b], dtype=torch.int32, device=device)
    packed_rows = [[1, 20, 1, 26], [15, 1, 12]] if cpu else [[1, 400, 1, 598], [300, 1, 250]]
    layouts = {"": None, "packed ": tuple(w.to(device) for w in packed_windows(packed_rows[:b], s))}
    # the build may take what the checks (seconds at these shapes) leave of the part's share
    cuda_why, figures = _cuda_extension(device, seconds - 30 - (time.monotonic() - STARTED))
    backends = {"triton": "", "cuda": cuda_why}
    skipped, ok = {name: why for name, why in backends.items() if why}, True
    for backend in (name for name, why in backends.items() if not why):
        for dtype in (torch.float32, torch.bfloat16):
            if cpu and dtype == torch.bfloat16 and backend == "triton":
                skipped["triton bf16"] = "no CUDA: Triton's interpreter, its CPU stand-in, computes bf16 wrongly"
                continue
            for layout, windows in layouts.items():
                for a in (0.0, 0.3, 1.0):
                    q, k, v, grad = make_inputs(int(a * 10), b, hq, hkv, s, d, dtype, device)
                    m = (row_mask_weights(a, lengths, s, "len_over_pos") if windows is None
                         else windowed_row_mask_weights(a, *windows))
                    ref = reference_with_grads(q, k, v, grad, m, lengths, torch.float64, windows=windows)
                    low = reference_with_grads(q, k, v, grad, m, lengths, dtype, windows=windows)
                    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                    out = soft_mask_attention(*leaves, m, lengths, backend=backend, windows=windows)
                    out.backward(grad)
                    worst = max((kernel_error(got, mine, want, dtype) for got, mine, want in
                                 zip([out.detach()] + [x.grad for x in leaves], low, ref)),
                                key=lambda found: found["error"] / found["bound"])
                    ok &= worst["ok"]
                    figures[f"{backend} {str(dtype)[6:]} {layout}a={a} error/bound"] = round(
                        worst["error"] / worst["bound"], 3)
    return {"status": "ran" if ok else "failed", "figures": figures, "skipped": skipped,
            "reason": "" if ok else "a kernel's error is above 2x PyTorch's in its precision"}


# -- parts 2-4: the benchmarks, imported ----------------------------------------------------------

def part_kernel_speed(cpu: bool, scratch: str, out: str, seconds: float) -> Dict:
    from benchmarks import soft_mask_attention

    if cpu:
        argv = ["--device", "cpu", "--lengths", "64", "--heads", "2", "--kv-heads", "1",
                "--methods", "reference", "sdpa_causal", "sdpa_full", "flex", "--warmup", "0", "--repeats", "1"]
    else:
        argv = ["--device", "cuda", "--dtype", "bf16", "--lengths", "4096", "--methods", "triton", "cuda",
                "sdpa_causal", "sdpa_full", "flex"]
    rows = soft_mask_attention.main(argv + ["--head-dim", "112", "--a", "0", "0.3", "1"])
    figures = {}
    for row in rows:
        for key in ("fwd", "fwd_bwd"):
            value = row[key]
            figures[f"s={row['seq']} a={row['a']} {row['method']} {key}"] = (
                f"{value * 1e3:.3f} ms" if isinstance(value, float) else value)
    return {"status": "ran", "figures": figures}


def _benchmark_rows(module, argv: List[str], scratch: str) -> List[dict]:
    os.makedirs(scratch, exist_ok=True)
    path = os.path.join(scratch, "rows.json")
    module.main(argv + ["--output-json", path])
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def part_train_step(cpu: bool, scratch: str, out: str, seconds: float) -> Dict:
    from benchmarks import train_step

    if cpu:
        argv = ["--recipe", "tiny", "--seq-length", "64", "--micro-batch-sizes", "2", "--precision", "fp32"]
    else:
        argv = ["--recipe", "conan_1p4b", "--num-layers", "4", "--seq-length", "4096", "--micro-batch-sizes", "1",
                "--precision", "bf16"]
    from megatron_conan.ops.engines import transformer_engine_available

    # with Transformer Engine where installed, and without it (megatron-core's local layers) always
    engines = ["on", "off"] if transformer_engine_available() else ["off"]
    rows = _benchmark_rows(train_step, argv + ["--recompute", "none", "--steps", "3", "--warmup", "1",
                                               "--transformer-engine", *engines], scratch)
    figures = {}
    for row in rows:
        label = f"micro {row['micro_batch']}, TE {'on' if row.get('transformer_engine') else 'off'}"
        if "error" in row:
            figures[label] = row["error"]
            continue
        figures[f"{label} tokens/s"] = round(row["tokens_per_s"], 1)
        figures[f"{label} MFU"] = round(row["mfu"], 4)
        if row.get("peak_memory_gib") is not None:
            figures[f"{label} peak GiB"] = round(row["peak_memory_gib"], 2)
    return {"status": "ran", "figures": figures}


def part_embed_step(cpu: bool, scratch: str, out: str, seconds: float) -> Dict:
    from benchmarks import embed_step

    # 20-token queries beside 64-512-token passages, padded and packed, against MNRL / CachedMNRL
    # (GradCache chunked by count, and by tokens on both sides: as many as a chunk of 16 can hold)
    # on CPU one batch, one untimed and one timed step per side: its figures are start-up, not speed
    if cpu:
        argv = ["--recipe", "tiny", "--batch", "8", "--query-length", "8", "--min-passage-length", "8",
                "--passage-length", "32", "--max-tokens-per-row", "64", "--mini-batch-size", "4",
                "--mini-batch-tokens", "128", "--precision", "fp32", "--batches", "1", "--steps", "1"]
    else:
        argv = ["--recipe", "conan_1p4b", "--batch", "32", "--query-length", "20", "--min-passage-length", "64",
                "--passage-length", "512", "--max-tokens-per-row", "1024", "--mini-batch-size", "16",
                "--mini-batch-tokens", "8192", "--precision", "bf16", "--batches", "2", "--steps", "2"]
    rows = _benchmark_rows(embed_step, argv + ["--data", "synthetic", "--packing", "--rounds", "1", "--warmup", "1"],
                           scratch)
    figures = {}
    for row in rows:
        theirs = embed_step.theirs_name(row)
        label = f"{row['mode']} {row['layout']}"
        figures[f"{label} ours pairs/s"] = round(row["ours_pairs_per_s"], 1)
        figures[f"{label} {theirs} pairs/s"] = round(row["theirs_pairs_per_s"], 1)
        figures[f"{label} ratio"] = round(row["ratio_median"], 3)
        figures[f"{label} padding share"] = round(row["padding_share"], 3)
    return {"status": "ran", "figures": figures}


def part_encode(cpu: bool, scratch: str, out: str, seconds: float) -> Dict:
    from benchmarks import encode_throughput

    # conan-encode's embedder (padded and packed) against SentenceTransformer.encode, same precision
    if cpu:
        argv = ["--shape", "tiny", "--texts", "32", "--chunk", "32", "--batch-size", "16", "--max-length", "48",
                "--max-tokens-per-row", "96", "--rounds", "1"]
    else:
        argv = ["--shape", "small", "--texts", "2048", "--chunk", "1024", "--batch-size", "128",
                "--max-length", "256", "--max-tokens-per-row", "1024", "--rounds", "3", "--device", "cuda",
                "--precision", "bf16"]
    os.makedirs(scratch, exist_ok=True)
    path = os.path.join(scratch, "encode.json")
    encode_throughput.main(argv + ["--packing", "--json", path])
    with open(path, encoding="utf-8") as handle:
        report = json.load(handle)
    figures = {"precision": report["precision"], "mean tokens": round(report["mean_tokens"], 1),
               "theirs texts/s": round(report["texts_per_s"]["theirs"]["wall"], 1)}
    for name, ratio in report["ratio_median"].items():
        figures[f"{name} texts/s"] = round(report["texts_per_s"][name]["wall"], 1)
        figures[f"{name} ratio"] = round(ratio["wall"], 3)
        figures[f"{name} min cosine"] = round(report["minimum_cosine"][name], 6)
    return {"status": "ran", "figures": figures}


PARTS = {"stages": part_stages, "kernels": part_kernels, "kernel_speed": part_kernel_speed,
         "train_step": part_train_step, "embed_step": part_embed_step, "encode": part_encode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--seconds", type=float, default=600.0, help="the part's share of the budget")
    args = parser.parse_args(argv)
    write_result(args.out, PARTS[args.part](args.cpu, args.scratch, args.out, args.seconds))
    # measured: after train() a child can spend tens of seconds in exit handlers (megatron-core's
    # checkpoint writer manager), time the budget then lacks; the result is written, so leave now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write_result(path: str, result: Dict) -> None:
    from megatron_conan.eval.text_io import write_atomically

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, default=str)
    write_atomically(path, write)


if __name__ == "__main__":
    sys.exit(main())
