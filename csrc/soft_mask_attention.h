// Soft-mask attention (docs/DESIGN.md section 4), CUDA backend: host entry points.
//
// Contract (the same as the Triton kernel and the PyTorch reference in
// megatron_conan/ops/soft_mask_attention/reference.py):
//   q [b, hq, s, d], k/v [b, hkv, s, d] (fp16, bf16 or fp32, stride 1 on d, d <= 128),
//   m float32 [b, s], lengths int32 [b] (right padding).
//   logit[i, j] = scale * q_i . k_j + log M[i, j];  M = 1 (j <= i), m_i (i < j < L), 0 (j >= L).
//   out [b, hq, s, d] (zero on padded rows), lse float32 [b, hq, s] (+inf on padded rows).
// The backward is deterministic (no atomics). The caller makes the tensors' device current and passes
// the CUDA stream to launch on (as an integer: torch.cuda.current_stream().cuda_stream).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace megatron_conan {

// Returns {out, lse}. `block_counter` (int32 [1] on the device), when given, is incremented once
// per (query block, key tile) the kernel visits: block skipping made observable.
std::vector<at::Tensor> soft_mask_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& m,
                                                    const at::Tensor& lengths, double softmax_scale,
                                                    const std::optional<at::Tensor>& block_counter,
                                                    int64_t cuda_stream);

// Returns {dq, dk, dv}.
std::vector<at::Tensor> soft_mask_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& out, const at::Tensor& lse,
                                                     const at::Tensor& m, const at::Tensor& lengths,
                                                     double softmax_scale, int64_t cuda_stream);

}  // namespace megatron_conan
