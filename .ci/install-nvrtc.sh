#!/usr/bin/env bash
# Installs NVRTC (the CUDA run-time compiler) from the PyPI wheel `nvidia-cuda-nvrtc-cu12` into <repo>/.nvrtc,
# unless it is already there, and prints the library folder to export.
#
# Usage: bash .ci/install-nvrtc.sh            # prints the lib dir on the last line of stdout
#        export ADAQUANT_NVRTC_LIB="$(bash .ci/install-nvrtc.sh | tail -n 1)"
#        export LD_LIBRARY_PATH="$ADAQUANT_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
#
# No CUDA toolkit and no GPU are needed: NVRTC alone compiles every kernel to PTX.
# The target folder can be changed with ADAQUANT_NVRTC_DIR.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${ADAQUANT_NVRTC_DIR:-$repo/.nvrtc}"
lib="$dir/nvidia/cuda_nvrtc/lib"

have_lib() {
    compgen -G "$lib/libnvrtc.so*" >/dev/null
}

if ! have_lib; then
    echo "installing nvidia-cuda-nvrtc-cu12 into $dir" >&2
    if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
        pip_cmd=(python3 -m pip)
    elif command -v pip3 >/dev/null; then
        pip_cmd=(pip3)
    elif command -v pip >/dev/null; then
        pip_cmd=(pip)
    else
        echo "error: pip is needed to install nvidia-cuda-nvrtc-cu12 (apt-get install python3-pip)" >&2
        exit 1
    fi
    "${pip_cmd[@]}" install --quiet --disable-pip-version-check --no-deps --target "$dir" "nvidia-cuda-nvrtc-cu12>=12.0,<13" >&2
fi

if ! have_lib; then
    echo "error: no libnvrtc.so* under $lib after installing the wheel" >&2
    exit 1
fi
# cudarc looks for libnvrtc.so, libnvrtc.so.12, ...; the wheel ships libnvrtc.so.12 only.
echo "$lib"
