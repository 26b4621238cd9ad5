#!/usr/bin/env bash
# attnkit's CPU kernel on AArch64 (NEON), run on an x86-64 machine under qemu-user. Not part of the
# test suite (a first call compiles for minutes under emulation); see docs/aarch64.md.
#
#   sudo bash scripts/aarch64-smoke.sh            # Debian/Ubuntu, as root (apt); then ~10 minutes
#
# It builds a sysroot once (Debian's arm64 python3.11 and the libraries it loads, extracted with
# dpkg -x; PyPI's manylinux aarch64 wheels of numpy, numba, llvmlite and scipy), then runs
# tests/aarch64_checks.py (NumPy arrays only: PyPI's aarch64 torch is a CUDA build) with qemu's
# neoverse-n1 CPU model (NumPy's OpenBLAS gave wrong products under qemu's default "max" model).
#
#   ATTNKIT_AARCH64_ROOT  where the sysroot goes (default ~/.cache/attnkit-aarch64)
#   QEMU_CPU              the CPU qemu emulates (default neoverse-n1; with the bf16 extension: max,
#                         with OPENBLAS_CORETYPE=NEOVERSEN1 NUMBA_CPU_NAME=neoverse-v1, see docs/aarch64.md)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${ATTNKIT_AARCH64_ROOT:-$HOME/.cache/attnkit-aarch64}
cpu=${QEMU_CPU:-neoverse-n1}
host_python=${PYTHON:-.venv/bin/python}

if ! command -v qemu-aarch64-static >/dev/null; then
    apt-get install -y -qq qemu-user-static
fi

if [ ! -x "$root/sysroot/usr/bin/python3.11" ]; then
    echo "aarch64-smoke: building the sysroot in $root (once)" >&2
    mkdir -p "$root/debs" "$root/sysroot"
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64
    fi
    apt-get update -qq
    packages="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6
              zlib1g libffi8 libexpat1 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6
              libreadline8 libuuid1 libcrypt1 libdb5.3 libgdbm6 libnsl2 libtirpc3 libzstd1
              libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1"
    (cd "$root/debs" && apt-get download $(for p in $packages; do echo "$p:arm64"; done))
    for deb in "$root"/debs/*.deb; do dpkg -x "$deb" "$root/sysroot"; done
    ln -sf python3.11 "$root/sysroot/usr/bin/python3"
fi

site="$root/site-packages"
if [ ! -d "$site/numba" ]; then
    echo "aarch64-smoke: fetching aarch64 wheels (the host's versions)" >&2
    mkdir -p "$root/wheels" "$site"
    pins=$("$host_python" -c "
import importlib.metadata as m
print(' '.join(f'{n}=={m.version(n)}' for n in ('numpy', 'numba', 'llvmlite', 'scipy', 'threadpoolctl', 'tqdm')))")
    "$host_python" -m pip download --quiet --only-binary=:all: --platform manylinux2014_aarch64 \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --python-version 3.11 \
        --implementation cp --no-deps -d "$root/wheels" $pins
    for wheel in "$root"/wheels/*.whl; do "$host_python" -m zipfile -e "$wheel" "$site"; done
fi

echo "aarch64-smoke: running tests/aarch64_checks.py on qemu-aarch64 -cpu $cpu" >&2
export PYTHONPATH="$site:$PWD" NUMBA_CACHE_DIR="$root/numba-cache-$cpu" PYTHONHOME="$root/sysroot/usr"
time qemu-aarch64-static -cpu "$cpu" -L "$root/sysroot" "$root/sysroot/usr/bin/python3.11" tests/aarch64_checks.py
