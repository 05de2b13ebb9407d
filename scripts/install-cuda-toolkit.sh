#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs from PyPI (no GPU and no system CUDA
# required): nvcc, cicc and the headers to compile candle's kernels, and the shared libraries
# cudarc links against. The driver library libcuda.so is not on PyPI; a stub carrying the
# symbols cudarc references is generated instead, so the binary links here and binds to the
# real driver on the GPU machine. Not part of CI: the wheels are ~630 MB.
#   KEDIT_CUDA   where the toolkit goes (default: ~/.cache/kedit/cuda-13.0)
# Prints the environment to export, e.g.  eval "$(scripts/install-cuda-toolkit.sh)"
set -euo pipefail
root="${KEDIT_CUDA:-$HOME/.cache/kedit/cuda-13.0}"
# The GPU machine's driver (580) runs CUDA 13.0; cudarc 0.19 knows 13.0.
wheels=(
  "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-curand==10.4.0.35" "nvidia-cublas==13.0.2.14"
)
if [ ! -x "$root/bin/nvcc" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check \
    -d "$tmp" "${wheels[@]}" >&2
  mkdir -p "$tmp/unpacked"
  for w in "$tmp"/*.whl; do
    python3 -m zipfile -e "$w" "$tmp/unpacked" >&2
  done
  mkdir -p "$(dirname "$root")"
  rm -rf "$root.partial"
  mv "$tmp/unpacked/nvidia/cu13" "$root.partial"
  chmod +x "$root.partial"/bin/* "$root.partial"/nvvm/bin/*
  # The linker looks for unversioned names.
  (cd "$root.partial/lib" && for so in *.so.*; do
    base="${so%%.so.*}.so"; [ -e "$base" ] || ln -s "$so" "$base"; done)
  # A stub driver: the driver API's entry points as empty functions, under the real library's
  # soname, so the dynamic loader binds the real driver at run time.
  # cuda.h renames many entry points by macro (cuMemAlloc -> cuMemAlloc_v2): take every
  # cuXxx identifier it mentions, both spellings included.
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$root.partial"/include/cuda.h \
    | sort -u | sed 's/.*/void &(void) {}/' >"$tmp/stub.c"
  # It lives in lib/stubs (where cudarc's build looks), never on LD_LIBRARY_PATH, so it cannot
  # shadow a real driver.
  mkdir -p "$root.partial/lib/stubs"
  gcc -shared -fPIC -o "$root.partial/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$tmp/stub.c"
  mv "$root.partial" "$root"
fi
cat <<ENV
export CUDA_ROOT="$root"
export PATH="$root/bin:\$PATH"
export LD_LIBRARY_PATH="$root/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
ENV
