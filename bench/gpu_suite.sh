#!/usr/bin/env bash
# The prepared GPU check of carat: one script for one lent H200 (x86-64, root, no network, Python 3.12 with
# torch 2.11+cu130; no deepspeed / webdataset there: they travel as wheels in .whl/). Expected 4-6 minutes
# there with the defaults (an estimate: not yet run on a GPU); each step has its own timeout, and all of them
# are cut to SUITE_BUDGET (500 s from the start), so the suite ends inside the call's 540 s.
#
# Before the call, here (once per session; it fetches ~5 MiB of wheels into the ignored .whl/):
#
#     bash bench/gpu_wheels.sh
#
# The call (the device tool's `run`; OUT is set there):
#
#     run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=540)
#
# with knobs in front of it when needed, e.g. command="SCALE=0.1 SWEEP_LENGTHS='2000 10891' bash bench/gpu_suite.sh".
# Give the machine back (give_back) afterwards unless you rerun at once.
#
# What comes back, under $OUT (at most 7 files, all small):
#   suite.log              everything every step printed (also the reply's output_tail, whose end is the summary)
#   summary.json           per step: name, status (ok / failed / timeout / skipped: why), rc, seconds; knobs; versions
#   model_sweep.json       step 3: bench/gpu_model_sweep.py --json (one record per point, OOM points included)
#   model_sweep.md         step 3: its printed table (time and activation memory vs sdpa)
#   model_sweep.partial.jsonl   step 3 only if it timed out: the points finished before the timeout
#   train_seed.json        step 4: bench/gpu_train_seed.py's JSON (samples/s, frames/s, peak GiB, MFU)
#   reference.json         step 5: bench/bench_reference.py --device cuda --json (carat bf16 vs reference fp32)
#
# Steps (each guarded: a failure is recorded and the next step still runs):
#   1. install .whl/*.whl into /tmp/site (PYTHONPATH=repo:/tmp/site), print versions, `import carat.train`
#   2. synthesize a corpus: python -m carat.data synth --out $SHARDS --scale $SCALE (no network needed)
#   3. bench/gpu_model_sweep.py on a reduced grid (needs CUDA)
#   4. bench/gpu_train_seed.py: seed preset, --launcher none, bf16 (precision auto = bf16 on CUDA), one epoch
#      capped at $TRAIN_STEPS steps (needs CUDA)
#   5. bench/bench_reference.py --device cuda: carat vs the reference-style path, clips/s, peak memory, OOM (needs CUDA)
#
# Knobs (environment; defaults in brackets, SMOKE=1 values after the slash):
#   SMOKE [0]                 1: shrink every step, for a CPU test of the script itself:
#                             OMP_NUM_THREADS=1 nice -n 19 env SMOKE=1 SKIP_WHEELS=1 OUT=/tmp/o bash bench/gpu_suite.sh
#   SKIP_WHEELS [auto]        1: no install (use what is importable); auto: skip unless python3 is CPython 3.12
#   SHARDS [/tmp/shards]      corpus directory (removed first if it holds an earlier synth corpus)
#   SCALE [0.2 / 0.01]        synth scale: 0.2 = 3,265 / 374 / 932 clips, ~61 train batches at the seed's
#                             token budget, ~0.8 GB float16 (scale 1.0 is ~4 GiB and minutes to write)
#   LENGTH_SCALE [1.0 / 0.1]  synth --length-scale (1.0 = full MOSEI lengths)
#   SYNTH_TIMEOUT [90]
#   SWEEP_LENGTHS ["2000 5000 10891" / "200 400"]  SWEEP_BATCHES ["1 8" / "1 2"]
#   SWEEP_VARIANTS ["sdpa eager ckpt" / "sdpa ckpt"]  SWEEP_REPEATS [2 / 1]  SWEEP_CHUNK_FRAMES [""]
#   SWEEP_TIMEOUT [170]
#   TRAIN_STEPS [200 / 2]     the epoch cap (the epoch at SCALE=0.2 has ~61 batches, so it ends first)
#   TRAIN_EXTRA [""]          one more --section.key=value override for the training run
#   PEAK_TFLOPS [989]         dense bf16 peak for the MFU (H100/H200 SXM spec; ~790 measured here on H200)
#   TRAIN_TIMEOUT [210]
#   SMOKE_CPU_TRAIN [0]       1: run step 4 even without CUDA (tests its plumbing on a CPU; fp32, slow)
#   REF_MODELS ["tiny seed"]  REF_CLIPS [256 / 32]  REF_STEPS [8 / 2]  REF_TIMEOUT [90]
#   SUITE_BUDGET [500]        seconds from the start: each step's timeout is cut to what is left of it (minus
#                             15 s for the summary), so the suite ends inside run's timeout_s=540
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT=${OUT:-/tmp/gpusuite-out}
mkdir -p "$OUT" || exit 1
WORK=$(mktemp -d /tmp/gpusuite-work.XXXXXX) || exit 1
export PYTHONUNBUFFERED=1
# Everything from here on is printed and kept in $OUT/suite.log.
exec > >(tee -a "$OUT/suite.log") 2>&1
TEE_PID=$!

SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    d_scale=0.01 d_lscale=0.1 d_lengths="200 400" d_batches="1 2" d_variants="sdpa ckpt" d_repeats=1
    d_steps=2 d_ref_clips=32 d_ref_steps=2
else
    d_scale=0.2 d_lscale=1.0 d_lengths="2000 5000 10891" d_batches="1 8" d_variants="sdpa eager ckpt" d_repeats=2
    d_steps=200 d_ref_clips=256 d_ref_steps=8
fi
SKIP_WHEELS=${SKIP_WHEELS:-auto}
SHARDS=${SHARDS:-/tmp/shards}
SCALE=${SCALE:-$d_scale}
LENGTH_SCALE=${LENGTH_SCALE:-$d_lscale}
SYNTH_TIMEOUT=${SYNTH_TIMEOUT:-90}
SWEEP_LENGTHS=${SWEEP_LENGTHS:-$d_lengths}
SWEEP_BATCHES=${SWEEP_BATCHES:-$d_batches}
SWEEP_VARIANTS=${SWEEP_VARIANTS:-$d_variants}
SWEEP_REPEATS=${SWEEP_REPEATS:-$d_repeats}
SWEEP_CHUNK_FRAMES=${SWEEP_CHUNK_FRAMES:-}
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-170}
TRAIN_STEPS=${TRAIN_STEPS:-$d_steps}
TRAIN_EXTRA=${TRAIN_EXTRA:-}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-210}
SMOKE_CPU_TRAIN=${SMOKE_CPU_TRAIN:-0}
REF_MODELS=${REF_MODELS:-tiny seed}
REF_CLIPS=${REF_CLIPS:-$d_ref_clips}
REF_STEPS=${REF_STEPS:-$d_ref_steps}
REF_TIMEOUT=${REF_TIMEOUT:-90}
SUITE_BUDGET=${SUITE_BUDGET:-500}
CUDA=0        # set by step 1
STATUS=""     # a step function sets "skipped: why" to mark itself skipped
SUITE_START=$(date +%s)
SUITE_DEADLINE=$(( SUITE_START + SUITE_BUDGET ))
: >"$WORK/steps.tsv"

run_step() {  # run_step NUMBER NAME FUNCTION: run it in this shell, record rc / status / seconds
    local num=$1 name=$2 fn=$3 start rc status secs
    echo
    echo "=== step $num: $name ($(date -u +%H:%M:%S) UTC) ==="
    STATUS=""
    start=$(date +%s)
    "$fn"
    rc=$?
    secs=$(( $(date +%s) - start ))
    if [ -n "$STATUS" ]; then status=$STATUS
    elif [ "$rc" = 0 ]; then status=ok
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout
    else status=failed; fi
    echo "=== step $num: $name: $status (rc $rc, ${secs} s) ==="
    printf '%s\t%s\t%s\t%s\t%s\n' "$num" "$name" "$status" "$rc" "$secs" >>"$WORK/steps.tsv"
}

need_cuda() {  # sets STATUS and fails when there is no CUDA device
    if [ "$CUDA" != 1 ]; then
        STATUS="skipped: no CUDA device (torch.cuda.is_available() is False)"
        echo "$STATUS"
        return 1
    fi
}

limit() {  # t=$(limit SECONDS): the step's timeout, cut to what is left of SUITE_BUDGET; fails if <= 10 s are left
    local want=$1 left=$(( SUITE_DEADLINE - $(date +%s) - 15 ))
    [ "$left" -gt 10 ] || return 1
    [ "$left" -lt "$want" ] && { echo "timeout cut from $want s to $left s (SUITE_BUDGET)" >&2; want=$left; }
    echo "$want"
}

budget_spent() {
    STATUS="skipped: SUITE_BUDGET=$SUITE_BUDGET s spent"
    echo "$STATUS"
}

# -- 1. wheels, versions, import check ---------------------------------------------------------------------
step_install() {
    local rc=0 skip=$SKIP_WHEELS wheels
    python3 -c 'import sys, platform; print("python", sys.version.split()[0], platform.machine(), sys.executable)'
    if [ "$skip" = auto ]; then
        if python3 -c 'import sys, platform; sys.exit(not (sys.version_info[:2] == (3, 12) and platform.machine() == "x86_64" and sys.implementation.name == "cpython"))'; then
            skip=0
        else
            skip=1
            echo "wheel install skipped: the wheels in .whl/ are for CPython 3.12 x86-64 (SKIP_WHEELS=0 forces it)"
        fi
    fi
    if [ "$skip" = 1 ]; then
        [ "$SKIP_WHEELS" = 1 ] && echo "wheel install skipped (SKIP_WHEELS=1)"
    elif ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no wheels in .whl/: run bash bench/gpu_wheels.sh here and call with carry [\".whl\"]"
        rc=1
    else
        wheels=(.whl/*.whl)
        # pydantic 2.13 needs typing-extensions >= 4.14.1: carried one only if the machine's is older.
        if ! python3 -c 'import sys, importlib.metadata as m; from packaging.version import Version as V
sys.exit(V(m.version("typing_extensions")) < V("4.14.1"))' 2>/dev/null; then
            echo "typing-extensions here is older than 4.14.1 (or unreadable): installing the carried one too"
            wheels+=(.whl/opt/*.whl)
        fi
        ls -l "${wheels[@]}"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${wheels[@]}" || rc=$?
        echo "pip install rc $rc"
        # The repo first: carat comes from the working tree (nothing in /tmp/site is called carat anyway).
        export PYTHONPATH=$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    case ":${PYTHONPATH:-}:" in *":$REPO:"*) ;; *) export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} ;; esac
    echo "PYTHONPATH=$PYTHONPATH"
    # The JSON goes to a file named on the command line: deepspeed's import logs to stdout.
    python3 - "$WORK/versions.json" <<'EOF' || rc=1
import importlib, importlib.metadata, json, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    info["device_memory_gib"] = round(total / 2**30, 1)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
for name, dist in (("deepspeed", "deepspeed"), ("webdataset", "webdataset"), ("pydantic", "pydantic"),
                   ("pydantic_core", "pydantic-core"), ("hjson", "hjson"), ("braceexpand", "braceexpand"),
                   ("typing_extensions", "typing-extensions"), ("numpy", "numpy"), ("scipy", "scipy"),
                   ("sklearn", "scikit-learn"), ("pyarrow", "pyarrow"), ("carat", None)):
    try:
        mod = importlib.import_module(name)
        info[name] = getattr(mod, "__version__", None) or importlib.metadata.version(dist)
        if name in ("deepspeed", "webdataset", "pydantic", "carat"):
            info[name + "_from"] = mod.__file__
    except Exception as exc:  # recorded, the suite goes on
        info[name] = f"import failed: {type(exc).__name__}: {exc}"
json.dump(info, open(sys.argv[1], "w"))
EOF
    python3 -m json.tool "$WORK/versions.json" 2>/dev/null || cat "$WORK/versions.json"
    CUDA=$(python3 -c 'import json, sys; print(int(json.load(open(sys.argv[1])).get("cuda_available", False)))' \
        "$WORK/versions.json" 2>/dev/null || echo 0)
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    if python3 -c "import carat.train" && python3 -c "import carat.train.launch, carat.data.loader.pipeline, deepspeed"; then
        echo "import carat.train (and carat.train.launch, carat.data.loader.pipeline, deepspeed): ok"
    else
        echo "import check failed"
        rc=1
    fi
    return "$rc"
}

# -- 2. synthetic corpus -------------------------------------------------------------------------------------
step_synth() {
    if [ -e "$SHARDS" ] && [ -n "$(ls -A "$SHARDS" 2>/dev/null)" ]; then
        if [ -f "$SHARDS/manifest.parquet" ] && [ -f "$SHARDS/card.json" ]; then
            echo "removing the earlier corpus in $SHARDS"
            rm -rf -- "$SHARDS"
        else
            echo "$SHARDS exists and holds something other than a carat corpus: set SHARDS elsewhere"
            return 1
        fi
    fi
    local t
    t=$(limit "$SYNTH_TIMEOUT") || { budget_spent; return 0; }
    timeout -k 10 "$t" python3 -m carat.data synth --out "$SHARDS" --scale "$SCALE" \
        --length-scale "$LENGTH_SCALE" --seed 0 --no-progress || return $?
    du -sh "$SHARDS"
    python3 - "$SHARDS" <<'EOF'
import sys
from collections import Counter
from carat.data.corpus.shards import read_manifest
rows = read_manifest(sys.argv[1]).to_pylist()
print("clips per split:", dict(Counter(r["split"] for r in rows)),
      "max audio frames:", max(r["len_audio"] for r in rows))
EOF
}

# -- 3. model sweep ------------------------------------------------------------------------------------------
step_sweep() {
    need_cuda || return 0
    local rc extra=()
    [ -n "$SWEEP_CHUNK_FRAMES" ] && read -r -a chunks <<<"$SWEEP_CHUNK_FRAMES" && extra=(--chunk-frames "${chunks[@]}")
    read -r -a lengths <<<"$SWEEP_LENGTHS"
    read -r -a batches <<<"$SWEEP_BATCHES"
    read -r -a variants <<<"$SWEEP_VARIANTS"
    local t
    t=$(limit "$SWEEP_TIMEOUT") || { budget_spent; return 0; }
    rm -f "$OUT/model_sweep.json"
    timeout -k 10 "$t" python3 bench/gpu_model_sweep.py --lengths "${lengths[@]}" \
        --batches "${batches[@]}" --variants "${variants[@]}" --repeats "$SWEEP_REPEATS" "${extra[@]}" \
        --json "$OUT/model_sweep.json" 2> >(tee "$WORK/sweep.stderr" >&2) | tee "$OUT/model_sweep.md"
    rc=${PIPESTATUS[0]}
    sleep 1  # the stderr tee may still be writing
    if [ ! -s "$OUT/model_sweep.json" ] && grep -q '^{"variant"' "$WORK/sweep.stderr" 2>/dev/null; then
        grep '^{"variant"' "$WORK/sweep.stderr" >"$OUT/model_sweep.partial.jsonl"
        echo "sweep ended early (rc $rc): $(wc -l <"$OUT/model_sweep.partial.jsonl") points kept in model_sweep.partial.jsonl"
    fi
    return "$rc"
}

# -- 4. seed training, one capped epoch ----------------------------------------------------------------------
step_train() {
    if [ "$SMOKE_CPU_TRAIN" = 1 ] && [ "$CUDA" != 1 ]; then
        echo "SMOKE_CPU_TRAIN=1: running on the CPU (fp32), to test the step's plumbing only"
    else
        need_cuda || return 0
    fi
    [ -f "$SHARDS/manifest.parquet" ] || { echo "no corpus in $SHARDS (step 2 failed)"; return 1; }
    local rc extra=()
    [ -n "$TRAIN_EXTRA" ] && extra=("--extra=$TRAIN_EXTRA")
    local t
    t=$(limit "$TRAIN_TIMEOUT") || { budget_spent; return 0; }
    rm -f "$OUT/train_seed.json"
    timeout -k 10 "$t" python3 bench/gpu_train_seed.py --shards "$SHARDS" --steps "$TRAIN_STEPS" \
        --peak-tflops "$PEAK_TFLOPS" "${extra[@]}" | tee "$WORK/train.stdout"
    rc=${PIPESTATUS[0]}
    # Its stdout is carat.train's own output, then the JSON (json.dumps(indent=2): from a line "{" to the end).
    python3 - "$WORK/train.stdout" "$OUT/train_seed.json" <<'EOF' || { [ "$rc" = 0 ] && rc=1; }
import json, sys
lines = open(sys.argv[1]).read().splitlines()
starts = [i for i, line in enumerate(lines) if line == "{"]
if not starts:
    sys.exit("no JSON in gpu_train_seed.py's output")
result = json.loads("\n".join(lines[starts[-1]:]))
json.dump(result, open(sys.argv[2], "w"), indent=2)
print("train_seed.json:", json.dumps(result))
EOF
    return "$rc"
}

# -- 5. carat vs reference on the GPU ------------------------------------------------------------------------
step_reference() {
    need_cuda || return 0
    [ -f "$SHARDS/manifest.parquet" ] || { echo "no corpus in $SHARDS (step 2 failed)"; return 1; }
    local t
    t=$(limit "$REF_TIMEOUT") || { budget_spent; return 0; }
    read -r -a models <<<"$REF_MODELS"
    timeout -k 10 "$t" python3 bench/bench_reference.py "$SHARDS" --device cuda --models "${models[@]}" \
        --clips "$REF_CLIPS" --rounds 1 --max-steps "$REF_STEPS" --json "$OUT/reference.json"
}

echo "carat GPU suite: $(date -u +%FT%TZ), host $(hostname), repo $REPO, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "knobs: SMOKE=$SMOKE SKIP_WHEELS=$SKIP_WHEELS SHARDS=$SHARDS SCALE=$SCALE LENGTH_SCALE=$LENGTH_SCALE"
echo "       SWEEP_LENGTHS='$SWEEP_LENGTHS' SWEEP_BATCHES='$SWEEP_BATCHES' SWEEP_VARIANTS='$SWEEP_VARIANTS'" \
     "SWEEP_REPEATS=$SWEEP_REPEATS SWEEP_CHUNK_FRAMES='$SWEEP_CHUNK_FRAMES' TRAIN_STEPS=$TRAIN_STEPS" \
     "TRAIN_EXTRA='$TRAIN_EXTRA' PEAK_TFLOPS=$PEAK_TFLOPS"
echo "       timeouts: synth $SYNTH_TIMEOUT s, sweep $SWEEP_TIMEOUT s, train $TRAIN_TIMEOUT s, reference $REF_TIMEOUT s;" \
     "whole suite $SUITE_BUDGET s"
echo "cpus $(getconf _NPROCESSORS_ONLN), memory $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}'), /tmp free $(df -h /tmp | awk 'NR==2 {print $4}')"

run_step 1 "wheels + versions + import" step_install
run_step 2 "synthesize corpus (scale $SCALE, length scale $LENGTH_SCALE)" step_synth
run_step 3 "gpu_model_sweep.py" step_sweep
run_step 4 "gpu_train_seed.py (seed preset, --launcher none)" step_train
run_step 5 "bench_reference.py on GPU" step_reference

total=$(( $(date +%s) - SUITE_START ))
export SMOKE SCALE LENGTH_SCALE SWEEP_LENGTHS SWEEP_BATCHES SWEEP_VARIANTS SWEEP_REPEATS SWEEP_CHUNK_FRAMES \
    TRAIN_STEPS TRAIN_EXTRA PEAK_TFLOPS SHARDS
python3 - "$WORK/steps.tsv" "$WORK/versions.json" "$OUT/summary.json" "$total" "$OUT" <<'EOF'
import json, os, sys
steps = []
for line in open(sys.argv[1]):
    num, name, status, rc, secs = line.rstrip("\n").split("\t")
    steps.append({"step": int(num), "name": name, "status": status, "rc": int(rc), "seconds": int(secs)})
try:
    versions = json.load(open(sys.argv[2]))
except Exception:
    versions = None
knobs = {k: os.environ.get(k, "") for k in ("SMOKE", "SHARDS", "SCALE", "LENGTH_SCALE", "SWEEP_LENGTHS",
         "SWEEP_BATCHES", "SWEEP_VARIANTS", "SWEEP_REPEATS", "SWEEP_CHUNK_FRAMES", "TRAIN_STEPS", "TRAIN_EXTRA",
         "PEAK_TFLOPS")}
json.dump({"total_seconds": int(sys.argv[4]), "steps": steps, "knobs": knobs, "versions": versions},
          open(sys.argv[3], "w"), indent=1)
print()
print("| step | name | status | rc | seconds |")
print("|---|---|---|---|---|")
for s in steps:
    print(f"| {s['step']} | {s['name']} | {s['status']} | {s['rc']} | {s['seconds']} |")
print(f"total {sys.argv[4]} s; files in {sys.argv[5]}:", " ".join(sorted(os.listdir(sys.argv[5]))))
EOF
failed=$(awk -F'\t' '$3 == "failed" || $3 == "timeout"' "$WORK/steps.tsv" | wc -l)
rm -rf -- "$WORK"
# Let tee write the last lines into suite.log before the command returns.
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
[ "$failed" = 0 ]
