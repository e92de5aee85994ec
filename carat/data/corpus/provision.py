"""Corpus provisioning for the commands that train (``carat.train``, ``carat.tune``): make sure the shard
directory holds a corpus, synthesizing the quickstart's only where that cannot replace data, and check it once
before any worker starts (verification, text lengths against the model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from carat.config import CaratConfig, TrainConfig
from carat.errors import DataError


CORPUS_MARKERS: tuple[str, ...] = ("manifest.parquet", "shards.parquet", "card.json", ".journal")
"""Files whose presence says a corpus is (or was being) written in a directory."""
SYNTH_IN_PROGRESS = ".synth-in-progress"
"""Written by train-time synthesis before it starts and removed when it is done: leftovers of an interrupted
quickstart synthesis may be resumed, a prepared (or completed synthetic) corpus never gets overwritten."""
SYNTH_LOCK = ".synth.lock"


def default_shard_dir() -> str:
    """The quickstart's shard directory: the only one train-time synthesis may write into."""
    return TrainConfig().shard_dir


def corpus_leftovers(shard_dir: Path) -> list[str]:
    """What of a corpus sits in ``shard_dir`` (manifest, shard table, card, journal, any split's tar files)."""
    found = [name for name in CORPUS_MARKERS if (shard_dir / name).exists()]
    tars = sorted(p.relative_to(shard_dir).as_posix() for p in shard_dir.glob("*/*.tar"))
    if tars:
        found.append(f"{len(tars)} shard file(s) such as {tars[0]}")
    return found


def how_to_make_a_corpus(shard_dir: Path) -> str:
    return (f"make one with `python -m carat.data prepare --source csd --input CSD_DIR --out {shard_dir}` "
            f"(CMU-MOSEI you hold) or `python -m carat.data synth --out {shard_dir}` (synthetic), then check it "
            f"with `python -m carat.data verify {shard_dir}`")


def ensure_shards(cfg: CaratConfig, shard_dir: Path, before_synthesis: Callable[[], None] | None = None) -> None:
    """Make sure ``shard_dir`` holds a corpus, synthesizing the quickstart's only where that cannot replace data.

    ``before_synthesis`` runs once, under the lock, just before a synthesis starts (``main`` starts Ray there so
    that its daemons come up on the other core while this one synthesizes).

    Synthesis happens only into the default shard directory (``train.shard_dir`` unset), with
    ``train.synth_if_missing``, and only while that directory holds nothing of a corpus (or only the
    leftovers of an interrupted train-time synthesis). A named directory without a manifest, or one with a
    card, shard table or shards but no manifest (an interrupted ``prepare``, a deleted manifest), is an
    error naming what is missing: real data is never replaced by synthetic data.
    """
    if (shard_dir / "manifest.parquet").is_file():
        return
    named = Path(cfg.train.shard_dir) != Path(default_shard_dir())
    leftovers = corpus_leftovers(shard_dir)
    # Our own interrupted synthesis left its marker and never got to its card (written last): resumable.
    ours = (shard_dir / SYNTH_IN_PROGRESS).is_file() and not (shard_dir / "card.json").exists()
    if leftovers and not ours:
        raise DataError(
            f"{shard_dir} holds {', '.join(leftovers)} but no manifest.parquet: an incomplete or damaged "
            f"corpus (an interrupted `prepare`, or a deleted manifest). carat does not synthesize over it. "
            f"Rerun the command that made it (prepare reuses every shard it can verify), or "
            f"{how_to_make_a_corpus(shard_dir)}")
    if named or not cfg.train.synth_if_missing:
        why = ("train-time synthesis only fills the default shard_dir "
               f"{default_shard_dir()!r}" if named else "train.synth_if_missing is false")
        raise DataError(f"no corpus in {shard_dir} (no manifest.parquet; {why}): {how_to_make_a_corpus(shard_dir)}")
    synthesize_default_corpus(cfg, shard_dir, before_synthesis)


def synthesize_default_corpus(cfg: CaratConfig, shard_dir: Path,
                              before_synthesis: Callable[[], None] | None = None) -> None:
    """Synthesize the quickstart corpus under a lock: processes starting together (Ray Tune trials) wait for
    the first one and then use its corpus."""
    from carat.data.sources.synth import synthesize_corpus
    from carat.locks import FileLock

    shard_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(shard_dir / SYNTH_LOCK, what=f"synthesis into {shard_dir}", blocking=True):
        if (shard_dir / "manifest.parquet").is_file():  # another process finished while we waited
            return
        print(f"[carat] no corpus in the default {shard_dir}: synthesizing the quickstart corpus "
              f"(scale {cfg.synth.scale}); for real data see `python -m carat.data prepare --help`", flush=True)
        if before_synthesis is not None:
            before_synthesis()
        marker = shard_dir / SYNTH_IN_PROGRESS
        marker.write_text("train-time synthesis in progress; removed when it completes\n")
        synthesize_corpus(shard_dir, cfg.synth, cfg.storage)
        marker.unlink()


def verify_once(cfg: CaratConfig, shard_dir: Path) -> None:
    """train.verify_corpus before anything starts, by one process (rank 0 or the Ray driver): a damaged or
    mismatched corpus is reported with shard and key instead of failing batches mid-epoch."""
    import os

    if cfg.train.verify_corpus == "off" or os.environ.get("RANK", "0") != "0":
        return
    from carat.data.corpus.verify import require_verified

    require_verified(shard_dir, cfg.train.verify_corpus)


def check_corpus_fits_model(cfg: CaratConfig, shard_dir: Path) -> None:
    """Text longer than model.text_max_positions under text_overflow="error" would stop the run at its first
    batch holding such a clip (inside a worker, after start-up); the manifest's lengths say so up front."""
    if cfg.model.text_overflow != "error":
        return
    import pyarrow.compute as pc

    from carat.data.corpus.shards import read_manifest

    limit = cfg.model.text_max_positions
    table = read_manifest(shard_dir).select(["key", "len_text"])
    over = table.filter(pc.greater(table["len_text"], limit))
    if over.num_rows:
        longest = int(pc.max(over["len_text"]).as_py())
        keys = over["key"].to_pylist()
        raise DataError(f"{over.num_rows} clip(s) of {shard_dir} have more text steps than "
                        f"model.text_max_positions={limit} (longest {longest}: e.g. {', '.join(keys[:3])}); raise "
                        "model.text_max_positions or set model.text_overflow='truncate'")
