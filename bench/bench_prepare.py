"""Benchmark: writing the synthetic corpus (``python -m carat.data synth``) with float16 vs float32 storage.

Each variant runs in its own child process (so peak RSS is that variant's own ``ru_maxrss``) and reports wall
time, segments per second, bytes on disk and peak RSS; the parent also times feature generation alone on a
sample of segments, to split the time into generating and writing. Variants run back to back in one
invocation so their ratio is meaningful on a shared machine.

    nice -n 10 python bench/bench_prepare.py --scale 1.0            # full size (16,326 / 1,871 / 4,659)
    python bench/bench_prepare.py --scale 0.02 --length-scale 0.1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_child(out_dir: Path, scale: float, length_scale: float, dtype: str, reference: bool) -> dict:
    """Write one corpus in this process; report time, size and peak RSS."""
    sys.path.insert(0, str(REPO))
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, split_sizes, synthesize_corpus

    cfg = SynthConfig(scale=scale, length_scale=length_scale)
    start = time.perf_counter()
    synthesize_corpus(out_dir, cfg, StorageConfig(dtype=dtype), progress=False, reference=reference)
    wall = time.perf_counter() - start
    n = sum(split_sizes(cfg).values())
    card = json.loads((out_dir / "card.json").read_text())
    return {
        "dtype": dtype, "segments": n, "wall_s": round(wall, 1), "segments_per_s": round(n / wall, 1),
        "shard_bytes": card["shards"]["total_bytes"], "dir_bytes": _dir_bytes(out_dir),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "fused_floor_micro_f1": (card["reference_scorer"] or {}).get("fused", {}).get("tuned_on_valid", {})
        .get("micro_f1"),
    }


def time_generation(scale: float, length_scale: float, sample: int) -> dict:
    """Seconds to generate (not write) ``sample`` segments spread over the train split."""
    sys.path.insert(0, str(REPO))
    from carat.data.sources.synth import SynthConfig, SyntheticCorpus

    start = time.perf_counter()
    corpus = SyntheticCorpus(SynthConfig(scale=scale, length_scale=length_scale))
    plan_s = time.perf_counter() - start
    refs = corpus.refs()["train"]
    step = max(1, len(refs) // sample)
    chosen = refs[::step][:sample]
    corpus.load(chosen[0])  # warm-up: lazy imports (scipy.signal) must not be timed
    start = time.perf_counter()
    frames = 0
    for ref in chosen:
        seg = corpus.load(ref)
        frames += sum(seg.lengths)
    gen_s = time.perf_counter() - start
    return {"plan_s": round(plan_s, 2), "sampled": len(chosen), "generate_s_per_segment": gen_s / len(chosen),
            "frames_per_segment": frames / len(chosen)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--length-scale", type=float, default=1.0)
    p.add_argument("--dtypes", default="float16,float32")
    p.add_argument("--out-root", default="/tmp/carat_bench_prepare")
    p.add_argument("--no-reference", action="store_true", help="skip the reference scorer (timed separately)")
    p.add_argument("--keep", action="store_true", help="keep the written corpora")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    root = Path(args.out_root)
    if args.child:
        result = run_child(root / args.child, args.scale, args.length_scale, args.child, not args.no_reference)
        print(json.dumps(result))
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"# bench_prepare: scale {args.scale}, length_scale {args.length_scale}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    gen = time_generation(args.scale, args.length_scale, sample=200)
    print(json.dumps({"generation_only": gen}))
    results = []
    for dtype in args.dtypes.split(","):
        shutil.rmtree(root / dtype, ignore_errors=True)
        cmd = [sys.executable, __file__, "--child", dtype, "--scale", str(args.scale), "--length-scale",
               str(args.length_scale), "--out-root", str(root)] + (["--no-reference"] if args.no_reference else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["generate_share"] = round(gen["generate_s_per_segment"] * result["segments"] / result["wall_s"], 2)
        results.append(result)
        print(json.dumps(result))
        if not args.keep:
            shutil.rmtree(root / dtype, ignore_errors=True)
    if len(results) == 2:
        a, b = results
        print(json.dumps({"ratio_bytes": round(b["shard_bytes"] / a["shard_bytes"], 3),
                          "ratio_wall": round(b["wall_s"] / a["wall_s"], 3),
                          "variants": f"{b['dtype']} / {a['dtype']}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
