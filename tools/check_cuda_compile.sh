#!/usr/bin/env bash
# Compile-only check of the CUDA sources in csrc/ (no GPU needed): every .cu with nvcc for sm_90a,
# every .cpp binding with the host compiler (-fsyntax-only), against this Python's torch headers.
# Exits non-zero as soon as one file stops compiling. Usage: tools/check_cuda_compile.sh
# Environment: PYTHON (default python), NVCC (default nvcc), CXX (default c++).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
nvcc="${NVCC:-nvcc}"
cxx="${CXX:-c++}"

# -isystem: warnings inside torch's headers are not ours to fix
read -r -a torch_system_includes <<< "$("$python" -c \
  "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))")"
python_include="$("$python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
cxx11_abi="$("$python" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
defines=(-DTORCH_EXTENSION_NAME=megatron_conan_soft_mask_cuda -DTORCH_API_INCLUDE_EXTENSION_H
         "-D_GLIBCXX_USE_CXX11_ABI=${cxx11_abi}")

out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT

shopt -s nullglob
status=0
for source in "$root"/csrc/*.cu; do
  echo "nvcc sm_90a: ${source#"$root"/}"
  "$nvcc" -c -std=c++17 -gencode=arch=compute_90a,code=sm_90a -O3 --use_fast_math \
    "${torch_system_includes[@]}" "-isystem" "$python_include" "-I$root/csrc" "${defines[@]}" \
    -o "$out_dir/$(basename "$source").o" "$source" || status=1
done
cuda_include="$(dirname "$(dirname "$(command -v "$nvcc")")")/include"
for source in "$root"/csrc/*.cpp; do
  echo "$cxx -fsyntax-only: ${source#"$root"/}"
  "$cxx" -fsyntax-only -std=c++17 "${torch_system_includes[@]}" -isystem "$python_include" "-I$root/csrc" \
    -isystem "$cuda_include" "${defines[@]}" "$source" || status=1
done
if [ "$status" -ne 0 ]; then
  echo "CUDA compile check FAILED" >&2
  exit 1
fi
echo "CUDA compile check passed"
