// pybind11 binding of the CUDA soft-mask attention as the torch extension
// `megatron_conan_soft_mask_cuda` (built by setup.py only where CUDA is present).
#include <torch/extension.h>

#include "soft_mask_attention.h"

// setup.py passes the architectures it builds SASS for, e.g. -DMEGATRON_CONAN_CUDA_ARCHS=sm80_sm90a;
// the dispatcher uses the extension only on GPUs that can run one of them (cuda_binding.runs_on).
#ifndef MEGATRON_CONAN_CUDA_ARCHS
#define MEGATRON_CONAN_CUDA_ARCHS unknown
#endif
#define MEGATRON_CONAN_STRINGIFY_(x) #x
#define MEGATRON_CONAN_STRINGIFY(x) MEGATRON_CONAN_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Soft-mask attention (causal -> bidirectional), fused CUDA forward/backward";
  module.attr("compiled_archs") = MEGATRON_CONAN_STRINGIFY(MEGATRON_CONAN_CUDA_ARCHS);
  module.def("forward", &megatron_conan::soft_mask_attention_forward,
             "forward(q, k, v, m, lengths, softmax_scale, block_counter, cuda_stream, key_lo=None, key_hi=None)"
             " -> [out, lse]",
             pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("m"),
             pybind11::arg("lengths"), pybind11::arg("softmax_scale"),
             pybind11::arg("block_counter"), pybind11::arg("cuda_stream"),
             pybind11::arg("key_lo") = pybind11::none(), pybind11::arg("key_hi") = pybind11::none());
  module.def("backward", &megatron_conan::soft_mask_attention_backward,
             "backward(grad_out, q, k, v, out, lse, m, lengths, softmax_scale, cuda_stream, key_lo=None, "
             "key_hi=None) -> [dq, dk, dv]",
             pybind11::arg("grad_out"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
             pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("m"),
             pybind11::arg("lengths"), pybind11::arg("softmax_scale"), pybind11::arg("cuda_stream"),
             pybind11::arg("key_lo") = pybind11::none(), pybind11::arg("key_hi") = pybind11::none());
}
