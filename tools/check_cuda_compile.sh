#!/usr/bin/env bash
# Compile-only check of the CUDA sources in csrc/ (no GPU needed): every .cu with nvcc for each
# architecture setup.py builds with this nvcc (sm_80, sm_86, sm_89, sm_90a, sm_100 as the toolkit
# allows; the table is cuda_binding.ARCHITECTURES), every .cpp binding with the host compiler
# (-fsyntax-only), against this Python's torch headers. Exits non-zero if any file fails.
# Usage: tools/check_cuda_compile.sh
# Environment: PYTHON (default python), NVCC (default nvcc), CXX (default c++), CUDA_ARCHS (a
# space-separated subset such as "90a" for a quicker check; default: all of the toolkit's).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
nvcc="${NVCC:-nvcc}"
cxx="${CXX:-c++}"
if ! command -v "$nvcc" > /dev/null; then
  echo "nvcc not found: $nvcc (set NVCC)" >&2
  exit 1
fi

# -isystem: warnings inside torch's headers are not ours to fix
read -r -a torch_system_includes <<< "$("$python" -c \
  "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))")"
python_include="$("$python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
cxx11_abi="$("$python" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
defines=(-DTORCH_EXTENSION_NAME=megatron_conan_soft_mask_cuda -DTORCH_API_INCLUDE_EXTENSION_H
         "-D_GLIBCXX_USE_CXX11_ABI=${cxx11_abi}")

# the architectures and their flags exactly as setup.py derives them (cuda_binding.py, by path)
read -r -a archs <<< "${CUDA_ARCHS:-$("$python" - "$root" "$("$nvcc" --version)" <<'PY'
import importlib.util, os, sys
root, version_text = sys.argv[1], sys.argv[2]
path = os.path.join(root, "megatron_conan", "ops", "soft_mask_attention", "cuda_binding.py")
spec = importlib.util.spec_from_file_location("_conan_cuda_binding", path)
binding = importlib.util.module_from_spec(spec)
spec.loader.exec_module(binding)
print(" ".join(binding.architectures_for_toolkit(binding.parse_nvcc_version(version_text))))
PY
)}"
if [ "${#archs[@]}" -eq 0 ]; then
  echo "this nvcc builds none of the extension's architectures (CUDA 11.0 or newer needed)" >&2
  exit 1
fi
archs_macro="-DMEGATRON_CONAN_CUDA_ARCHS=$(printf 'sm%s_' "${archs[@]}" | sed 's/_$//')"

out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT

shopt -s nullglob
status=0
# The host-compiler checks run in the background beside nvcc: each compiler is single-threaded and
# CI has two cores.
cuda_include="$(dirname "$(dirname "$(command -v "$nvcc")")")/include"
host_checks=()
for source in "$root"/csrc/*.cpp; do
  echo "$cxx -fsyntax-only: ${source#"$root"/}"
  "$cxx" -fsyntax-only -std=c++17 "${torch_system_includes[@]}" -isystem "$python_include" "-I$root/csrc" \
    -isystem "$cuda_include" "${defines[@]}" "$archs_macro" "$source" &
  host_checks+=("$!")
done
for source in "$root"/csrc/*.cu; do
  for arch in "${archs[@]}"; do
    echo "nvcc sm_${arch}: ${source#"$root"/}"
    "$nvcc" -c -std=c++17 "-gencode=arch=compute_${arch},code=sm_${arch}" -O3 --use_fast_math \
      "${torch_system_includes[@]}" "-isystem" "$python_include" "-I$root/csrc" "${defines[@]}" \
      "$archs_macro" -o "$out_dir/$(basename "$source").sm_${arch}.o" "$source" || status=1
  done
done
for pid in "${host_checks[@]}"; do
  wait "$pid" || status=1
done
if [ "$status" -ne 0 ]; then
  echo "CUDA compile check FAILED" >&2
  exit 1
fi
echo "CUDA compile check passed"
