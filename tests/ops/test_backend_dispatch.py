"""Which soft-mask backend runs where, decided on CPU with the GPU, the extension's build and triton
injected; the architectures setup.py builds for each nvcc; launch failures that name the GPU."""

import ast
import os
import stat
from pathlib import Path

import pytest
import torch

from megatron_conan.ops.soft_mask_attention import cuda_binding, function
from megatron_conan.ops.soft_mask_attention.function import DeviceFacts, SoftMaskKernelError, choose_backend

ROOT = Path(__file__).resolve().parents[2]
EVERY_ARCH = ("80", "86", "89", "90a", "100")


def _gpu(capability, archs=EVERY_ARCH, triton=True, name="NVIDIA H200"):
    return DeviceFacts("cuda", capability, name, archs, triton)


@pytest.mark.parametrize("facts,head_dim,expected", [
    (DeviceFacts("cpu", triton_installed=True, cuda_archs=EVERY_ARCH), 112, "sdpa"),
    (_gpu((9, 0)), 112, "triton"),                           # both run: Triton first (tensor cores)
    (_gpu((9, 0), triton=False), 112, "cuda"),
    (_gpu((9, 0), archs=("80",), triton=False), 112, "sdpa"),  # sm_80 SASS does not run on sm_90
    (_gpu((8, 6), archs=("80",), triton=False), 112, "cuda"),  # ... but does on sm_86
    (_gpu((8, 9), archs=("80", "90a"), triton=False), 112, "cuda"),
    (_gpu((10, 0), archs=("80", "90a"), triton=False), 112, "sdpa"),  # an old build on Blackwell
    (_gpu((10, 0), archs=("80", "90a")), 112, "triton"),
    (_gpu((10, 0), triton=False), 112, "cuda"),
    (_gpu((12, 0), triton=False), 112, "sdpa"),              # sm_120 is another major: no SASS for it
    (_gpu((9, 0), archs=None, triton=False), 112, "sdpa"),   # extension not built
    (_gpu((9, 0), triton=False), 256, "sdpa"),               # CUDA kernel: d <= 128
    (_gpu((7, 0), archs=None), 64, "sdpa"),                  # V100: Triton's bf16 MMA needs sm_80
])
def test_auto_picks_a_backend_the_gpu_supports(facts, head_dim, expected):
    assert choose_backend("auto", facts, head_dim) == expected


def test_explicit_backends_are_honoured_or_refused_naming_the_gpu_and_the_build():
    h200 = _gpu((9, 0), archs=("80", "86"))
    assert choose_backend("triton", h200) == "triton"
    assert choose_backend("reference", h200) == "reference"
    with pytest.raises(RuntimeError, match=r"'cuda' cannot run on NVIDIA H200 \(sm_90\): the extension was built "
                                           r"for sm_80, sm_86"):
        choose_backend("cuda", h200)
    with pytest.raises(RuntimeError, match="'cuda' cannot run on cpu tensors: needs CUDA tensors"):
        choose_backend("cuda", DeviceFacts("cpu", cuda_archs=EVERY_ARCH))
    with pytest.raises(RuntimeError, match="is not built"):
        choose_backend("cuda", _gpu((9, 0), archs=None))
    with pytest.raises(RuntimeError, match="head dim 256 > 128"):
        choose_backend("cuda", _gpu((9, 0)), head_dim=256)
    with pytest.raises(RuntimeError, match="'triton' cannot run on cpu tensors: needs CUDA tensors"):
        choose_backend("triton", DeviceFacts("cpu", triton_installed=True))
    assert choose_backend("triton", DeviceFacts("cpu", triton_installed=True, triton_interpret=True)) == "triton"
    with pytest.raises(RuntimeError, match="triton is not installed"):
        choose_backend("triton", _gpu((9, 0), triton=False))
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("flash", h200)


def test_this_machine_resolves_without_a_gpu():
    assert function.resolve_backend("auto", torch.device("cpu"), 112) == "sdpa"


@pytest.mark.parametrize("capability,archs,runs", [
    ((8, 0), ("80",), True), ((8, 6), ("80",), True), ((8, 9), ("86",), True), ((8, 6), ("89",), False),
    ((9, 0), ("90a",), True), ((9, 0), ("80", "89"), False), ((10, 0), ("90a",), False),
    ((10, 0), ("100",), True), ((10, 3), ("100",), True), ((12, 0), ("100",), False), ((8, 0), (), False),
])
def test_sass_compatibility(capability, archs, runs):
    assert cuda_binding.runs_on(capability, archs) is runs


@pytest.mark.parametrize("version,archs", [
    ((10, 2), []), ((11, 0), ["80"]), ((11, 8), ["80", "86", "89"]), ((12, 4), ["80", "86", "89", "90a"]),
    ((12, 8), list(EVERY_ARCH)), ((13, 0), list(EVERY_ARCH)),
])
def test_architectures_follow_the_toolkit(version, archs):
    assert cuda_binding.architectures_for_toolkit(version) == archs


def test_nvcc_version_flags_and_the_recorded_list():
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\n"
    assert cuda_binding.parse_nvcc_version(text) == (12, 4)
    with pytest.raises(ValueError, match="release"):
        cuda_binding.parse_nvcc_version("command not found")
    assert cuda_binding.gencode_flags(["80", "90a"]) == ["-gencode=arch=compute_80,code=sm_80",
                                                         "-gencode=arch=compute_90a,code=sm_90a"]
    define = cuda_binding.archs_define(EVERY_ARCH)
    assert define == "-DMEGATRON_CONAN_CUDA_ARCHS=sm80_sm86_sm89_sm90a_sm100"
    assert cuda_binding.decode_archs(define.split("=", 1)[1]) == EVERY_ARCH
    assert cuda_binding.decode_archs("unknown") == ()


def _setup_function(name):
    """One function of setup.py, without running setup() (the module's body calls it)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"os": os}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("release,archs", [("12.4", "sm80_sm86_sm89_sm90a"), ("12.8", "sm80_sm86_sm89_sm90a_sm100")])
def test_setup_builds_for_what_the_nvcc_supports(tmp_path, monkeypatch, release, archs):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.chdir(ROOT)
    define, gencode = _setup_function("_cuda_architectures")(str(tmp_path))
    assert define == f"-DMEGATRON_CONAN_CUDA_ARCHS={archs}"
    assert gencode == cuda_binding.gencode_flags(cuda_binding.decode_archs(archs))


def test_a_failing_launch_names_the_backend_and_the_gpu(monkeypatch):
    monkeypatch.setattr(function, "device_facts", lambda device: _gpu((9, 0), archs=("80", "90a")))

    def kernel(*args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    with pytest.raises(SoftMaskKernelError, match=r"^soft-mask attention backend 'cuda' failed on NVIDIA H200 "
                                                  r"\(sm_90\); extension built for 80, 90a: RuntimeError: CUDA "
                                                  r"error: no kernel image") as caught:
        function._launch("cuda", torch.device("cuda", 0), kernel, 1, 2)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert function._launch("triton", torch.device("cuda", 0), lambda a, b: a + b, 1, 2) == 3


def _packed_inputs():
    from megatron_conan.ops.soft_mask_attention.schedule import windowed_row_mask_weights
    from megatron_conan.testing.soft_mask import make_inputs, packed_windows

    lo, hi = packed_windows([[1, 5, 2], [3, 4]], 8)
    q, k, v, grad = make_inputs(0, 2, 2, 1, 8, 16, torch.float32, "cpu")
    return q, k, v, grad, windowed_row_mask_weights(0.5, lo, hi), hi.max(dim=1).values, (lo, hi)


@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_packed_rows_reach_the_cuda_kernel_with_their_windows(monkeypatch, backend):
    """Packed rows run on the CUDA extension (explicit, or `auto` without Triton) with their key
    windows in the forward and the backward; the fake kernels stand in for the GPU."""
    from megatron_conan.ops.soft_mask_attention.reference import soft_mask_attention_reference

    monkeypatch.setattr(function, "device_facts", lambda device: _gpu((9, 0), triton=False))
    seen = {}

    def forward(q, k, v, m, lengths, softmax_scale, block_counter=None, windows=None):
        seen["forward"] = windows
        out, lse = soft_mask_attention_reference(q, k, v, m, lengths, softmax_scale, return_lse=True,
                                                 windows=windows)
        return out.detach(), lse

    def backward(grad_out, q, k, v, out, lse, m, lengths, softmax_scale, windows=None):
        seen["backward"] = windows
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    monkeypatch.setattr(cuda_binding, "soft_mask_attention_cuda_forward", forward)
    monkeypatch.setattr(cuda_binding, "soft_mask_attention_cuda_backward", backward)
    q, k, v, grad, m, lengths, windows = _packed_inputs()
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = function.soft_mask_attention(*leaves, m, lengths, backend=backend, windows=windows)
    out.backward(grad)
    for direction in ("forward", "backward"):
        for got, given in zip(seen[direction], windows):
            assert got.dtype == torch.int32 and torch.equal(got, given), direction
    torch.testing.assert_close(out, soft_mask_attention_reference(q, k, v, m, lengths, windows=windows))


def test_cuda_binding_checks_key_windows_without_the_extension():
    q, k, v, _, m, lengths, (lo, hi) = _packed_inputs()
    assert cuda_binding.key_window_arguments(None, q) == (None, None)
    key_lo, key_hi = cuda_binding.key_window_arguments((lo.long().t().contiguous().t(), hi.long()), q)
    assert key_lo.dtype == key_hi.dtype == torch.int32 and key_lo.is_contiguous()
    assert torch.equal(key_lo, lo) and torch.equal(key_hi, hi)
    with pytest.raises(ValueError, match=r"key windows must be \[b=2, s=8\]; got \(2, 7\), \(2, 8\)"):
        cuda_binding.soft_mask_attention_cuda_forward(q, k, v, m, lengths, 1.0, None, (lo[:, :7], hi))
    with pytest.raises(ValueError, match="a pair"):
        cuda_binding.soft_mask_attention_cuda_backward(q, q, k, v, q, m, m, lengths, 1.0, (lo,))
