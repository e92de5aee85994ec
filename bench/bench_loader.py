"""Benchmark of carat's token-budget planner, shard storage and loader (results: BENCHMARKS.md, Loader).

    OMP_NUM_THREADS=1 python bench/bench_loader.py [--samples 3000] [--workdir /tmp/carat-bench-loader]

1. Padding efficiency on the full-size synthetic length distribution (the lengths of
   ``SyntheticCorpus(SynthConfig()).refs()``, all splits, 22,856 segments, what ``python -m carat.data synth``
   writes): real / padded frames per modality and for the batch-cost modality, sorted token-budget batches
   (sort_jitter 0 and the default) vs random batches of the same sizes; step balance across 2 and 8 ranks.
2. float16 vs float32 storage of ``--samples`` segments drawn from that distribution, with features at
   realistic magnitudes (GloVe ~N(0, 0.4); FACET-like per-dim spreads 0.5..30; COVAREP-like F0 in 0..450 Hz
   plus spreads 0.05..20): bytes, write time, max abs / relative error.
3. Loader throughput reading those shards from local disk (page cache warm), in the calling process
   (num_workers=0, i.e. one core) and through a DataLoader with 1 and 2 worker processes, each with torch's
   default transfer (a fresh shared segment per batch, ``reuse_buffers=False``) and with the reused
   shared-memory rings (the default), and Batch features as float32 (the default) or as stored
   (``feature_dtype='stored'``): wall samples/s, frames/s (all three modalities), samples per CPU-second of
   main + workers (the per-core figure, robust to other jobs on shared cores: getrusage of this process and
   its reaped workers), and CPU microseconds per sample in the main process and in the workers; plus a
   per-stage breakdown of the one-core path.
4. The per-sample hash check (xxh3-64 of each sample's bytes against the manifest, on every read): loader CPU
   per sample with and without it, same float16 shards, same run, passes alternated (in process and with one
   DataLoader worker), and the hash alone per sample. ``--hash-check-only`` runs just this part (and writes
   only the float16 shards).
5. ``--bucket``: the same float16 shards in object storage, from a local S3-compatible server (moto's server
   mode on 127.0.0.1, started here; it needs ``moto[server]``), against local disk in the same run: without the
   block cache, with it cold (a fresh ``loader.cache_dir`` per pass: every block fetched once) and warm (every
   block on local disk), in process and with 2 DataLoader workers. CPU figures count this process and its
   workers, not the server. ``--bucket-only`` runs just this part.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from carat.data.loader.collate import collate, nonfinite_rows, to_batch
from carat.data.loader.pipeline import build_loader
from carat.data.loader.loader_config import LoaderConfig
from carat.data.loader.plan import batch_cost, cost_order, padding_efficiency, plan_batches, plan_epoch
from carat.data.sources.segment import EMOTIONS, FEATURE_DIMS, MODALITIES, Segment, SegmentRef
from carat.data.corpus.shards import StorageConfig, sample_hash, write_corpus
from carat.data.loader.shm_pool import SharedBufferPool
from carat.data.loader.split_index import load_split_index
from carat.data.sources.synth import SynthConfig, SyntheticCorpus
from carat.data.loader.tar_reader import ShardReader

WEIGHTS = (1.0, 1.0, 1.0)


def full_lengths() -> np.ndarray:
    """[N, 3] (text, visual, audio) lengths of every segment of the full-size synthetic corpus."""
    refs = SyntheticCorpus(SynthConfig()).refs()
    return np.array([ref.lengths for split in refs.values() for ref in split], dtype=np.int64)


def fmt_eff(e: dict[str, float]) -> str:
    return " | ".join(f"{e[k]:.3f}" for k in ("text", "visual", "audio", "cost"))


def bench_padding(lengths: np.ndarray, cfg: LoaderConfig) -> list[str]:
    lines = [f"lengths: N={len(lengths)}, text {lengths[:, 0].min()}-{lengths[:, 0].max()} (median "
             f"{int(np.median(lengths[:, 0]))}), visual {lengths[:, 1].min()}-{lengths[:, 1].max()} (median "
             f"{int(np.median(lengths[:, 1]))}), audio {lengths[:, 2].min()}-{lengths[:, 2].max()} (median "
             f"{int(np.median(lengths[:, 2]))})", "",
             "| batching (token_budget, max_batch_size) | batches | mean size | text | visual | audio | cost modality |",
             "|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(123)
    for budget in (32768, cfg.token_budget, 131072):
        t0 = time.perf_counter()
        batches = plan_batches(lengths, budget, cfg.max_batch_size, WEIGHTS, order=cost_order(lengths, WEIGHTS))
        plan_s = time.perf_counter() - t0
        sizes = np.array([len(b) for b in batches])
        jittered = plan_batches(lengths, budget, cfg.max_batch_size, WEIGHTS,
                                order=cost_order(lengths, WEIGHTS, cfg.sort_jitter, rng))
        perm = rng.permutation(len(lengths))
        random_batches = np.split(perm, np.cumsum(sizes)[:-1])
        tag = f"{budget}, {cfg.max_batch_size}"
        lines.append(f"| sorted, jitter 0 ({tag}); plan {plan_s * 1e3:.0f} ms | {len(batches)} | {sizes.mean():.1f} | "
                     f"{fmt_eff(padding_efficiency(lengths, batches, WEIGHTS))} |")
        lines.append(f"| sorted, jitter {cfg.sort_jitter} ({tag}) | {len(jittered)} | "
                     f"{len(lengths) / len(jittered):.1f} | {fmt_eff(padding_efficiency(lengths, jittered, WEIGHTS))} |")
        lines.append(f"| random, same sizes ({tag}) | {len(batches)} | {sizes.mean():.1f} | "
                     f"{fmt_eff(padding_efficiency(lengths, random_batches, WEIGHTS))} |")
    within_budget = sum(batch_cost(lengths[b], WEIGHTS) <= cfg.token_budget for b in batches) / len(batches)
    lines.append("")
    lines.append(f"audio sets the batch cost in {np.mean(lengths[:, 2] >= lengths.max(1)):.1%} of samples; "
                 f"batches within budget (131072 plan): {within_budget:.1%}")
    for world in (2, 8):
        plan = plan_epoch(lengths, token_budget=cfg.token_budget, max_batch_size=cfg.max_batch_size, weights=WEIGHTS,
                          world_size=world, train=True, seed=0, epoch=0, sort_jitter=cfg.sort_jitter)
        costs = np.array([[batch_cost(lengths[plan.batches[plan.schedule[r][s]]], WEIGHTS) for r in range(world)]
                          for s in range(plan.steps)])
        ratio = costs.min(1) / costs.max(1)
        per_rank = costs.sum(0)
        lines.append(f"train plan, {world} ranks (default config): {plan.steps} steps/rank, dropped "
                     f"{len(plan.dropped)} batches = {plan.dropped_samples} samples "
                     f"({plan.dropped_samples / len(lengths):.2%}); per-step min/max cost across ranks: median "
                     f"{np.median(ratio):.3f}, p5 {np.percentile(ratio, 5):.3f}; total cost per rank max/min "
                     f"{per_rank.max() / per_rank.min():.3f}")
    for workers in (1, 4):  # the DataLoader rings of a default-config rank on the full distribution
        plan = plan_epoch(lengths, token_budget=cfg.token_budget, max_batch_size=cfg.max_batch_size, weights=WEIGHTS,
                          world_size=1, train=True, seed=0, epoch=0, sort_jitter=cfg.sort_jitter)
        per_worker = [max(SharedBufferPool.batch_nbytes(lengths[plan.batches[b]], 2)
                          for b in plan.schedule[0][w::workers]) for w in range(workers)]
        depth = cfg.prefetch_factor + 1
        lines.append(f"shared rings, float16, {workers} worker(s) x {depth} slots: slot {max(per_worker) / 1e6:.1f} MB "
                     f"(largest batch), total {sum(per_worker) * depth / 1e6:.0f} MB per rank")
    return lines


# --------------------------------------------------------------------------------- realistic features


def realistic_scales(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(mean, std) per dim at magnitudes like the real MOSEI features."""
    text = (np.zeros(300), np.full(300, 0.4))
    visual = (rng.normal(0, 2, 35), np.exp(rng.uniform(np.log(0.5), np.log(30), 35)))
    audio_std = np.exp(rng.uniform(np.log(0.05), np.log(20), 74))
    audio_mean = rng.normal(0, 1, 74) * audio_std
    audio_mean[0], audio_std[0] = 200.0, 80.0  # F0 in Hz
    return {"text": text, "visual": visual, "audio": (audio_mean, audio_std)}


class RealisticSource:
    def __init__(self, lengths: np.ndarray, seed: int = 0):
        self.lengths = lengths
        self.scales = realistic_scales(np.random.default_rng(seed))
        self.seed = seed

    def refs(self) -> dict[str, list[SegmentRef]]:
        return {"train": [SegmentRef(f"bench{i:05d}[0]", "train", tuple(int(x) for x in row), i)
                          for i, row in enumerate(self.lengths)]}

    def load(self, ref: SegmentRef) -> Segment:
        rng = np.random.default_rng([self.seed, ref.locator])
        feats = {}
        for m, n in zip(MODALITIES, ref.lengths):
            mean, std = self.scales[m]
            x = rng.standard_normal((n, FEATURE_DIMS[m]), dtype=np.float32) * std.astype(np.float32) + mean.astype(np.float32)
            if m == "audio":
                x[:, 0] = np.clip(x[:, 0], 0, 450)
            feats[m] = x
        labels = (rng.random(len(EMOTIONS)) < 0.3).astype(np.uint8)
        return Segment(key=ref.key, video_id=ref.key[:10], split="train", labels=labels,
                       intensities=labels.astype(np.float32), sentiment=0.0, **feats)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.tar"))


def bench_storage(source: RealisticSource, workdir: Path,
                  dtypes: tuple[str, ...] = ("float16", "float32")) -> tuple[list[str], dict[str, Path]]:
    lines = ["| dtype | shards | bytes | bytes/sample | write s | max abs err text / visual / audio | max rel err |",
             "|---|---|---|---|---|---|---|"]
    dirs = {}
    refs = source.refs()
    for dtype in dtypes:
        out = workdir / dtype
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        index = write_corpus(refs, source.load, out, StorageConfig(dtype=dtype, shard_max_bytes=64 * 1024 * 1024),
                             progress=False)
        write_s = time.perf_counter() - t0
        dirs[dtype] = out
        errs, rel = measure_error(source, refs["train"][::25], dtype)
        total = du(out)
        lines.append(f"| {dtype} | {len(index.shards)} | {total / 1e6:.1f} MB | {total / len(refs['train']) / 1e3:.1f} kB | "
                     f"{write_s:.1f} | {errs['text']:.2e} / {errs['visual']:.2e} / {errs['audio']:.2e} | {rel:.2e} |")
    return lines, dirs


def measure_error(source: RealisticSource, refs: list[SegmentRef], dtype: str) -> tuple[dict[str, float], float]:
    errs = {m: 0.0 for m in MODALITIES}
    rel = 0.0
    for ref in refs:
        seg = source.load(ref)
        for m in MODALITIES:
            x = getattr(seg, m)
            y = x.astype(dtype).astype(np.float32)
            diff = np.abs(y - x)
            errs[m] = max(errs[m], float(diff.max()))
            nz = np.abs(x) > 1e-3
            rel = max(rel, float((diff[nz] / np.abs(x[nz])).max()))
    return errs, rel


# ------------------------------------------------------------------------------------------ throughput


def frames_in(batch) -> int:
    return int(batch.text_mask.sum() + batch.visual_mask.sum() + batch.audio_mask.sum())


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its finished (reaped) children, i.e. the DataLoader
    workers of past passes (getrusage: microsecond resolution, unlike os.times' 10 ms ticks)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def time_loader(shard_dir: Path, cfg: LoaderConfig, repeats: int, check_hashes: bool = True) -> dict[str, float]:
    """Full eval passes: best wall samples/s and frames/s, median samples per CPU-second and per-sample CPU.

    CPU-seconds count the main process and its DataLoader workers (reaped when the pass ends, so per-epoch
    fixed costs such as forking and first-touching the rings are included), so the per-core figure holds even
    when other jobs share the machine's cores and stretch wall time.
    """
    runs = []
    for _ in range(repeats):
        loader = build_loader(shard_dir, "train", cfg, rank=0, world_size=1, epoch=0, train=False)
        if not check_hashes:  # as for a corpus written before per-sample hashes: the reader skips the check
            loader.dataset.index.hashes = None
        (m0, w0), t0 = cpu_seconds(), time.perf_counter()
        n = frames = 0
        for batch in loader:
            n += len(batch)
            frames += frames_in(batch)
        dt = time.perf_counter() - t0
        m1, w1 = cpu_seconds()
        runs.append({"sps": n / dt, "fps": frames / dt, "seconds": dt, "main": m1 - m0, "workers": w1 - w0,
                     "sps_cpu": n / (m1 - m0 + w1 - w0), "fps_cpu": frames / (m1 - m0 + w1 - w0), "n": n})
    best = max(runs, key=lambda r: r["sps"])
    median = sorted(runs, key=lambda r: r["sps_cpu"])[len(runs) // 2]
    return {"sps": best["sps"], "fps": best["fps"], "seconds": best["seconds"], "sps_cpu": median["sps_cpu"],
            "fps_cpu": median["fps_cpu"],
            "main_us": median["main"] / median["n"] * 1e6, "workers_us": median["workers"] / median["n"] * 1e6}


def stage_breakdown(shard_dir: Path, cfg: LoaderConfig) -> str:
    """One-core time split: ranged read + tar parse + npy/json decode + checks; collate (pad); the batched
    finiteness check; to_batch (float32 cast, masks)."""
    loader = build_loader(shard_dir, "train", cfg, rank=0, world_size=1, epoch=0, train=False)
    index = load_split_index(shard_dir, "train")
    reader = ShardReader(shard_dir, index, reuse_buffers=True)
    t = np.zeros(4)
    n = 0
    for b in loader.plan.batches:
        t0 = time.perf_counter()
        samples, _ = reader.read(b)
        t1 = time.perf_counter()
        parts = collate(samples, 1.0)
        t2 = time.perf_counter()
        nonfinite_rows(parts.features())
        t3 = time.perf_counter()
        to_batch(parts)
        t4 = time.perf_counter()
        t += (t1 - t0, t2 - t1, t3 - t2, t4 - t3)
        n += len(b)
    reader.close()
    us = t / n * 1e6
    return (f"one-core stages per sample: read+parse+decode+checks {us[0]:.0f} us, collate (pad) {us[1]:.0f} us, "
            f"finiteness check {us[2]:.0f} us, to_batch (float32 cast, masks) {us[3]:.0f} us")


def hash_alone(shard_dir: Path) -> tuple[float, float]:
    """(us per sample, GB/s) of the per-sample hash alone, each sample hashed right after its ranged read, as in
    the loader (so its bytes are in cache, as there)."""
    import os

    index = load_split_index(shard_dir, "train")
    spent, nbytes = 0.0, 0
    fds = {sid: os.open(shard_dir / rel, os.O_RDONLY) for sid, rel in enumerate(index.shards)}
    try:
        for r in range(len(index)):
            data = os.pread(fds[int(index.shard_ids[r])], int(index.nbytes[r]), int(index.offsets[r]))
            t0 = time.process_time()
            sample_hash(data)
            spent += time.process_time() - t0
            nbytes += len(data)
    finally:
        for fd in fds.values():
            os.close(fd)
    return spent / len(index) * 1e6, nbytes / spent / 1e9


def bench_hash_check(shard_dir: Path, repeats: int) -> list[str]:
    """Loader CPU per sample with and without the per-sample hash check: same shards, same run, passes
    alternated so drift in the shared machine's load hits both alike; medians over ``repeats`` pairs."""
    us, gbps = hash_alone(shard_dir)
    lines = ["| workers | CPU us/sample with hash check | without | ratio with / without (median of pairs) | "
             "hash alone / without | samples per CPU-s with |", "|---|---|---|---|---|---|"]
    for workers in (0, 1):
        cfg = LoaderConfig(num_workers=workers, pin_memory=False)
        pairs = [(time_loader(shard_dir, cfg, 1, check_hashes=True), time_loader(shard_dir, cfg, 1, check_hashes=False))
                 for _ in range(repeats)]
        with_us = float(np.median([1e6 / a["sps_cpu"] for a, _ in pairs]))
        without_us = float(np.median([1e6 / b["sps_cpu"] for _, b in pairs]))
        ratio = float(np.median([b["sps_cpu"] / a["sps_cpu"] for a, b in pairs]))
        lines.append(f"| {workers} | {with_us:.1f} | {without_us:.1f} | {ratio:.3f} | {us / without_us:.1%} | "
                     f"{float(np.median([a['sps_cpu'] for a, _ in pairs])):,.0f} |")
    lines.append(f"\nxxh3-64 alone: {us:.1f} us per sample ({gbps:.1f} GB/s) over the same samples")
    return lines


# ------------------------------------------------------------------------------------------ object storage


@contextlib.contextmanager
def local_s3_server():
    """moto's S3 server on a free port of 127.0.0.1, with the AWS variables that point carat at it."""
    from carat.storage import forget_filesystems

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    forget_filesystems()
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("moto server did not start")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        forget_filesystems()


def bench_bucket(shard_dir: Path, workdir: Path, repeats: int) -> list[str]:
    """Loader throughput from the local S3 server vs local disk, without / with a cold / warm block cache."""
    from carat.data.corpus.remote import publish_corpus
    from carat.storage import ObjectPath

    lines = ["| source | num_workers | wall samples/s | samples per CPU-second | main CPU us/sample | "
             "workers CPU us/sample | wall vs disk | CPU/sample vs disk |", "|---|---|---|---|---|---|---|---|"]
    with local_s3_server():
        url = ObjectPath("s3://bench/corpus")
        url.fs.mkdir("bench")
        publish_corpus(shard_dir, url)
        for workers in (0, 2):
            base = dict(num_workers=workers, pin_memory=False)
            disk = time_loader(shard_dir, LoaderConfig(**base), repeats)
            rows = [("local disk", disk), ("bucket, no cache", time_loader(url, LoaderConfig(**base), repeats))]
            cold = []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory(dir=workdir) as cache:
                    cold.append(time_loader(url, LoaderConfig(**base, cache_dir=cache), 1))
            rows.append(("bucket, cache cold", max(cold, key=lambda r: r["sps"])))
            with tempfile.TemporaryDirectory(dir=workdir) as cache:
                time_loader(url, LoaderConfig(**base, cache_dir=cache), 1)  # fills it
                rows.append(("bucket, cache warm", time_loader(url, LoaderConfig(**base, cache_dir=cache), repeats)))
            for name, r in rows:
                cpu = r["main_us"] + r["workers_us"]
                lines.append(f"| {name} | {workers} | {r['sps']:,.0f} | {r['sps_cpu']:,.0f} | {r['main_us']:.0f} | "
                             f"{r['workers_us']:.0f} | {r['sps'] / disk['sps']:.2f} | "
                             f"{cpu / (disk['main_us'] + disk['workers_us']):.2f} |")
                print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/carat-bench-loader"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the written shards")
    parser.add_argument("--hash-check-only", action="store_true",
                        help="only part 4: loader CPU with and without the per-sample hash check (float16 shards)")
    parser.add_argument("--bucket", action="store_true", help="also part 5: the shards in a local S3 server")
    parser.add_argument("--bucket-only", action="store_true", help="only part 5 (float16 shards)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = LoaderConfig()
    lengths = full_lengths()
    if args.bucket_only:
        rng = np.random.default_rng(7)
        subset = lengths[rng.choice(len(lengths), size=args.samples, replace=False)]
        args.workdir.mkdir(parents=True, exist_ok=True)
        _, dirs = bench_storage(RealisticSource(subset), args.workdir, dtypes=("float16",))
        print(f"## object storage: local S3 server (moto) vs local disk ({args.samples} segments, float16, eval "
              f"pass, best wall of {args.repeats}, median CPU figures)")
        bench_bucket(dirs["float16"], args.workdir, args.repeats)
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
        return
    if args.hash_check_only:
        rng = np.random.default_rng(7)
        subset = lengths[rng.choice(len(lengths), size=args.samples, replace=False)]
        args.workdir.mkdir(parents=True, exist_ok=True)
        _, dirs = bench_storage(RealisticSource(subset), args.workdir, dtypes=("float16",))
        print(f"## per-sample hash check ({args.samples} segments, float16, {args.repeats} alternated pairs)")
        print("\n".join(bench_hash_check(dirs["float16"], args.repeats)))
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
        return
    print("## padding efficiency (real / padded frames)")
    print("\n".join(bench_padding(lengths, cfg)))

    rng = np.random.default_rng(7)
    subset = lengths[rng.choice(len(lengths), size=args.samples, replace=False)]
    source = RealisticSource(subset)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"\n## storage ({args.samples} segments drawn from the distribution; mean audio {subset[:, 2].mean():.0f})")
    lines, dirs = bench_storage(source, args.workdir)
    print("\n".join(lines))

    print("\n## loader throughput (eval pass over all samples, page cache warm; best wall of "
          f"{args.repeats}, median CPU figures; default token_budget={cfg.token_budget}, "
          f"max_batch_size={cfg.max_batch_size}, prefetch_factor={cfg.prefetch_factor})")
    print("| storage | num_workers | transfer | Batch features | wall samples/s | wall frames/s | "
          "samples per CPU-second | frames per CPU-second | main CPU us/sample | workers CPU us/sample |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    variants = [(0, True, "float32"), (0, True, "stored")]
    variants += [(w, reuse, out) for w in (1, 2) for reuse, out in ((False, "float32"), (True, "float32"),
                                                                      (True, "stored"))]
    for dtype, shard_dir in dirs.items():
        for workers, reuse, out in variants:
            run_cfg = LoaderConfig(num_workers=workers, pin_memory=False, reuse_buffers=reuse, feature_dtype=out)
            r = time_loader(shard_dir, run_cfg, args.repeats)
            transfer = "-" if workers == 0 else ("reused rings" if reuse else "fresh segments (torch)")
            shown = "float32" if out == "float32" else f"{dtype} (stored)"
            print(f"| {dtype} | {workers} | {transfer} | {shown} | {r['sps']:,.0f} | {r['fps'] / 1e6:.2f} M | "
                  f"{r['sps_cpu']:,.0f} | {r['fps_cpu'] / 1e6:.2f} M | {r['main_us']:.0f} | {r['workers_us']:.0f} |",
                  flush=True)
        print(stage_breakdown(shard_dir, LoaderConfig(num_workers=0)))
    print(f"\n## per-sample hash check (float16, {args.repeats} alternated pairs)")
    print("\n".join(bench_hash_check(dirs["float16"], args.repeats)))
    if args.bucket:
        print(f"\n## object storage: local S3 server (moto) vs local disk (float16)")
        bench_bucket(dirs["float16"], args.workdir, args.repeats)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
