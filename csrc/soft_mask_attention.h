// Soft-mask attention (docs/DESIGN.md section 4), CUDA backend: host entry points.
//
// Contract (the same as the Triton kernel and the PyTorch reference in
// megatron_conan/ops/soft_mask_attention/reference.py):
//   q [b, hq, s, d], k/v [b, hkv, s, d] (fp16, bf16 or fp32, stride 1 on d, d <= 128),
//   m float32 [b, s], lengths int32 [b] (right padding),
//   key_lo, key_hi (optional, both or neither) int32 [b, s], contiguous: packed rows, where row i
//     attends to keys [lo_i, hi_i), its own text (reference.key_windows_from_cu_seqlens); every
//     position of a text carries the text's window, and positions in no text an empty one. Without
//     them the window is [0, L) on rows i < L and empty beyond (lengths are then what is read).
//   logit[i, j] = scale * q_i . k_j + log M[i, j];  M = 1 (lo_i <= j <= i), m_i (i < j < hi_i), 0 else.
//   out [b, hq, s, d] (zero on rows with an empty window), lse float32 [b, hq, s] (+inf there).
// Key tiles outside the union of a query block's windows are not visited (nor, in the backward,
// query tiles outside the union of a key block's windows). Windows are clipped to [0, s).
// The backward is deterministic (no atomics). The caller makes the tensors' device current and passes
// the CUDA stream to launch on (as an integer: torch.cuda.current_stream().cuda_stream).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace megatron_conan {

// Returns {out, lse}. `block_counter` (int32 [1] on the device), when given, is incremented once
// per (query block, key tile) the kernel visits: block skipping made observable (query blocks of 16
// rows, key tiles of 32: triton_kernel.windowed_block_count(m, windows, hq, 16, 32) counts the same).
// The key windows come last so that calls without them read as before.
std::vector<at::Tensor> soft_mask_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& m,
                                                    const at::Tensor& lengths, double softmax_scale,
                                                    const std::optional<at::Tensor>& block_counter,
                                                    int64_t cuda_stream, const std::optional<at::Tensor>& key_lo,
                                                    const std::optional<at::Tensor>& key_hi);

// Returns {dq, dk, dv}.
std::vector<at::Tensor> soft_mask_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& out, const at::Tensor& lse,
                                                     const at::Tensor& m, const at::Tensor& lengths,
                                                     double softmax_scale, int64_t cuda_stream,
                                                     const std::optional<at::Tensor>& key_lo,
                                                     const std::optional<at::Tensor>& key_hi);

}  // namespace megatron_conan
