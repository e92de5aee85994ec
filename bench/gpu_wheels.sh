#!/usr/bin/env bash
# Fetch the wheels that bench/gpu_suite.sh installs on the lent GPU machine (Python 3.12, x86-64, no network),
# into .whl/ (ignored through .git/info/exclude; the run tool carries it with carry: [".whl"]).
#
#     bash bench/gpu_wheels.sh          # here, once per session (needs pip's index; ~1 min)
#
# What the device lacks (its package list: /work/.library/device/KINDS.md, "Python packages already there"),
# found by running `python -m carat.train --launcher none` and the synth CLI with an import tracer and ray /
# optuna blocked: both run without them (ray is imported only inside the ray launcher and carat.tune, optuna
# only by Ray Tune's searcher), so neither travels (ray's wheel alone is ~70 MB, over the 64 MiB limit).
#   deepspeed 0.19.8   carat.train (built here: a pure-python sdist build, py3-none-any)
#     hjson, pydantic (+ pydantic-core, annotated-types, typing-inspection)   deepspeed's imports
#   webdataset         carat/data/loader/tar_reader.py imports it at module level
#     braceexpand      webdataset's import
# The rest of deepspeed's and webdataset's requirements (einops, msgpack, ninja, numpy, packaging, psutil,
# py-cpuinfo, tqdm, pyyaml) and carat's (scipy, scikit-learn, pyarrow, h5py, tensorboard, matplotlib) are on
# the device. boto3/botocore (tensorboard's optional S3 support) are optional and stay behind.
# typing-extensions goes to .whl/opt/ (not installed by the suite's .whl/*.whl): the suite installs it only if
# the device's copy is older than pydantic needs.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

PY=${PYTHON:-python3}
DEST=.whl
rm -rf "$DEST"
mkdir -p "$DEST/opt"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # download DEST SPEC...
    local dest=$1; shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$dest" "$@"
}
# Versions: the ones carat is tested with here; pydantic-core must be the exact one this pydantic pins.
download "$DEST" hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
    typing-inspection==0.4.2 webdataset==1.0.2 braceexpand==0.1.7
download "$DEST/opt" typing-extensions==4.15.0

# deepspeed ships as an sdist only; with no DS_BUILD_* flags its build compiles nothing (ops JIT-build at run time).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DEST"

ds=$(ls "$DEST"/deepspeed-*.whl)
case "$ds" in
    *-py3-none-any.whl) ;;
    *) echo "gpu_wheels.sh: unexpected deepspeed wheel tag: $ds (want py3-none-any)" >&2; exit 1 ;;
esac
# One version of each package: two stop the device's whole install.
dups=$(for wheel in "$DEST"/*.whl; do basename "$wheel"; done | sed 's#.*/##; s/-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "gpu_wheels.sh: more than one wheel of: $dups" >&2; exit 1; }
# pydantic-core must be a CPython 3.12 x86-64 build.
ls "$DEST"/pydantic_core-*-cp312-*x86_64*.whl >/dev/null

ls -l "$DEST" "$DEST/opt"
total=$(du -cb "$DEST"/*.whl "$DEST"/opt/*.whl | tail -1 | cut -f1)
repo=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
printf 'wheels: %s bytes (%.1f MiB); working tree that travels: %s bytes (%.1f MiB); sum %.1f MiB of 64 MiB\n' \
    "$total" "$(echo "$total/1048576" | bc -l)" "$repo" "$(echo "$repo/1048576" | bc -l)" \
    "$(echo "($total+$repo)/1048576" | bc -l)"
