"""Issue 10, part 2: every checkpoint is complete-or-absent; resume takes the newest complete one, rebuilds
history.jsonl from it, refuses a changed configuration before writing anything; one process per run name;
a full disk is a clear error that leaves the previous checkpoint valid."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from carat.locks import FileLock
from carat.train import checkpoint as ckpt
from carat.train import __main__ as train_main
from carat.train import loop

# -- the file logic, without DeepSpeed --------------------------------------------------------------------


def _fake_tag(root: Path, tag: str, *, complete: bool = True, epoch: int = 0) -> Path:
    tag_dir = root / tag
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (tag_dir / "rng_rank0.pt").write_bytes(b"r" * 10)
    if complete:
        ckpt.write_completion_marker(tag_dir, ckpt.list_tag_files(tag_dir), {"epoch": epoch})
        ckpt.write_latest(root, tag)
    return tag_dir


def test_a_tag_is_complete_only_with_its_marker_and_matching_files(tmp_path):
    tag = _fake_tag(tmp_path, "epoch-001")
    assert ckpt.incomplete_reason(tag) is None
    (tag / "rng_rank0.pt").unlink()
    assert "rng_rank0.pt is missing" in ckpt.incomplete_reason(tag)
    os.truncate(tag / "mp_rank_00_model_states.pt", 40)
    assert "truncated" in ckpt.incomplete_reason(tag)
    torn = _fake_tag(tmp_path, "epoch-002", complete=False)
    assert "no completion marker" in ckpt.incomplete_reason(torn)


def test_resume_takes_the_newest_complete_tag_and_names_what_it_skipped(tmp_path):
    _fake_tag(tmp_path, "epoch-001", epoch=1)
    _fake_tag(tmp_path, "epoch-002", epoch=2)
    _fake_tag(tmp_path, "epoch-003", complete=False)  # killed mid-save: DeepSpeed files, no marker
    (tmp_path / "latest").write_text("epoch-003")  # what DeepSpeed's own `latest` would have said
    point = ckpt.find_resume_point(tmp_path)
    assert point.tag == "epoch-002"
    assert "epoch-003: no completion marker" in point.warning()
    (tmp_path / "latest").unlink()  # a deleted `latest` changes nothing
    assert ckpt.find_resume_point(tmp_path).tag == "epoch-002"


def test_only_torn_tags_start_fresh_but_damaged_complete_ones_are_an_error(tmp_path):
    _fake_tag(tmp_path / "a", "epoch-001", complete=False)
    point = ckpt.find_resume_point(tmp_path / "a")
    assert point.tag is None and "starting fresh" in point.warning()
    tag = _fake_tag(tmp_path / "b", "epoch-001")
    os.truncate(tag / "rng_rank0.pt", 1)
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint in .* is damaged"):
        ckpt.find_resume_point(tmp_path / "b")
    assert ckpt.find_resume_point(tmp_path / "empty") is None


def test_checkpoints_from_before_markers_resume_from_latest_or_the_newest_tag(tmp_path):
    import torch

    for epoch in (1, 2):  # what an older carat wrote: loadable client state without "record", no marker
        tag = _fake_tag(tmp_path, f"epoch-00{epoch}", complete=False)
        torch.save({"epoch": epoch, "module": {}}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("epoch-001")
    point = ckpt.find_resume_point(tmp_path)
    assert point.tag == "epoch-001" and point.legacy
    (tmp_path / "latest").unlink()  # deleted: the newest old tag, not a restart from epoch 0
    assert ckpt.find_resume_point(tmp_path).tag == "epoch-002"
    # a torn save of this carat (its client state has "record", its marker never came) is not taken for one
    torch.save({"epoch": 3, "record": {}}, _fake_tag(tmp_path, "epoch-003", complete=False) / "mp_rank_00_model_states.pt")
    assert ckpt.find_resume_point(tmp_path).tag == "epoch-002"


class _Engine:
    def __init__(self, applied: bool, norm) -> None:
        self.applied, self.norm = applied, norm

    def was_step_applied(self) -> bool:
        return self.applied

    def get_global_grad_norm(self):
        return self.norm


@pytest.mark.parametrize("applied, norm, finite", [
    (True, 1.5, True), (True, None, True), (False, 1.0, False), (True, float("inf"), False),
    (True, float("nan"), False),
])
def test_a_step_deepspeed_skipped_or_with_a_non_finite_gradient_norm_counts_as_non_finite(applied, norm, finite):
    import torch

    from carat.train.divergence import step_was_finite

    engine = _Engine(applied, torch.tensor(norm) if isinstance(norm, float) else norm)
    assert step_was_finite(engine) is finite


def test_config_mismatches_name_the_keys_and_allow_where_and_how(tmp_path):
    saved = {"preset": "tiny", "model": {"hidden_size": 16}, "train": {"epochs": 3, "run_name": "a",
                                                                       "launcher": "ray"}, "tune": {"x": 1}}
    current = {"preset": "seed", "model": {"hidden_size": 32, "new_key": 1},
               "train": {"epochs": 4, "run_name": "b", "launcher": "none"}, "tune": {"x": 2}}
    assert ckpt.config_mismatches(saved, current) == ["model.hidden_size: 16 -> 32", "train.epochs: 3 -> 4"]


def test_replacing_best_keeps_the_old_one_until_the_new_one_is_in(tmp_path):
    best, staging = tmp_path / "best", tmp_path / "best.staging"
    _fake_tag(best, "best")
    _fake_tag(staging, "best")
    (staging / "best" / "new").write_text("1")
    os.replace(best, tmp_path / "best.old")  # a crash between the two renames of replace_dir
    ckpt.recover_dir(best)
    assert (best / "best").is_dir() and not (best / "best" / "new").exists() and not staging.exists()
    _fake_tag(staging, "best")
    ckpt.replace_dir(staging, best)
    assert not staging.exists() and not (tmp_path / "best.old").exists()


def test_disk_full_names_the_path_and_the_checkpoint_that_stays_valid(tmp_path):
    _fake_tag(tmp_path, "epoch-001")
    with pytest.raises(ckpt.CheckpointError) as info:
        with ckpt.checkpoint_write_errors(tmp_path, "epoch-002"):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "epoch-002" / "x.pt"))
    message = str(info.value)
    assert message.startswith(f"No space left on device while writing {tmp_path / 'epoch-002' / 'x.pt'}")
    assert "epoch-002" in message and "MiB" in message
    assert f"{tmp_path / 'epoch-001'} stays valid" in message


# -- the real loop, one process ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tests.data_fixtures import tiny_loop_corpus

    return tiny_loop_corpus(tmp_path_factory.mktemp("corpus") / "shards")


def _args(shards: Path, storage: Path, name: str, epochs: int = 3, *extra: str) -> list[str]:
    from tests.data_fixtures import loop_args

    return loop_args(shards, storage, name, epochs, *extra)


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A complete 3-epoch run (keep_checkpoints=3 so every epoch's tag stays)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    storage = tmp_path_factory.mktemp("runs")
    assert train_main.main(_args(shards, storage, "done", 3, "--train.keep_checkpoints=3")) == 0
    return storage / "done"


def _history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_torn_newest_tag_and_a_lost_history_line_resume_to_the_uninterrupted_result(finished, shards, tmp_path,
                                                                                      capsys):
    run = tmp_path / "runs" / "done"
    shutil.copytree(finished, run)
    points = run / "checkpoints"
    assert all(ckpt.incomplete_reason(points / f"epoch-00{i}") is None for i in (1, 2, 3))
    # Kill during epoch 3's save: DeepSpeed's optimizer file half written, no marker, `latest` gone; and
    # epoch 2's history line never appended; results not written.
    os.truncate(points / "epoch-003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", 1000)
    (points / "epoch-003" / ckpt.COMPLETE_FILE).unlink()
    (points / "latest").unlink()
    history = (run / "history.jsonl").read_text().splitlines()
    (run / "history.jsonl").write_text("\n".join(history[:1]) + "\n")
    (run / "results.json").unlink()
    assert train_main.main(_args(shards, tmp_path / "runs", "done", 3, "--train.keep_checkpoints=3")) == 0
    out = capsys.readouterr().out
    assert "skipped incomplete checkpoint(s)" in out and "epoch-003: no completion marker" in out
    assert f"resumed from {points / 'epoch-002'}" in out
    assert [h["epoch"] for h in _history(run)] == [0, 1, 2]
    assert [h["train/total"] for h in _history(run)] == pytest.approx(
        [h["train/total"] for h in _history(finished)], rel=1e-6)
    a = json.loads((finished / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert b["test"]["micro_f1"] == pytest.approx(a["test"]["micro_f1"], abs=1e-9)
    assert ckpt.incomplete_reason(points / "epoch-003") is None


@pytest.mark.slow
def test_a_changed_model_size_or_corpus_is_refused_before_anything_is_written(finished, shards, tmp_path, capsys):
    run = tmp_path / "runs" / "done"
    shutil.copytree(finished, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    code = train_main.main(_args(shards, tmp_path / "runs", "done", 4, "--model.hidden_size=32",
                                 "--model.num_heads=4"))
    err = capsys.readouterr().err
    assert code == 1
    assert "model.hidden_size: 16 -> 32" in err and "train.epochs: 3 -> 4" in err
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    table = other / "shards.parquet"
    import pyarrow.parquet as pq

    t = pq.read_table(table)
    pq.write_table(t.set_column(t.schema.get_field_index("sha256"), "sha256",
                                [["0" * 64] * t.num_rows]), table)
    assert train_main.main(_args(other, tmp_path / "runs", "done", 3)) == 1
    assert "corpus: shards" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "tensorboard" not in p.parts
             and p.name != train_main.RUN_LOCK}
    before = {p: v for p, v in before.items() if p.name != train_main.RUN_LOCK}
    assert after == before  # config.toml, card.json, history, checkpoints: untouched


def test_a_second_process_on_the_same_run_name_gets_a_clear_error(shards, tmp_path, capsys):
    run = tmp_path / "runs" / "busy"
    with FileLock(run / train_main.RUN_LOCK, what="held by a test"):
        assert train_main.main(_args(shards, tmp_path / "runs", "busy")) == 1
    err = capsys.readouterr().err
    assert f"run directory {run} is in use by pid {os.getpid()}" in err


@pytest.mark.parametrize("name", ["..", ".", "a/../..", "x\\y"])
def test_run_names_that_escape_the_runs_directory_are_refused(shards, tmp_path, capsys, name):
    assert train_main.main(_args(shards, tmp_path / "runs", name)) == 1
    assert "run_name" in capsys.readouterr().err
    assert not (tmp_path / train_main.RUN_LOCK).exists()


@pytest.mark.slow
def _fill_the_disk_when(monkeypatch, full) -> None:
    """DeepSpeed's save_checkpoint writes a partial file and fails with ENOSPC for the tags ``full(tag)`` picks."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine.save_checkpoint

    def save(self, save_dir, tag=None, **kwargs):
        if full(tag):
            partial = Path(save_dir) / tag / "mp_rank_00_model_states.pt"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(partial))
        return original(self, save_dir, tag=tag, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", save)


def test_disk_full_during_a_checkpoint_leaves_the_previous_one_valid(shards, tmp_path, monkeypatch, capsys):
    _fill_the_disk_when(monkeypatch, lambda tag: tag == "epoch-002")
    assert train_main.main(_args(shards, tmp_path / "runs", "full", 3)) == 1
    err = capsys.readouterr().err
    points = tmp_path / "runs" / "full" / "checkpoints"
    assert "No space left on device while writing" in err and str(points / "epoch-002") in err
    assert f"{points / 'epoch-001'} stays valid" in err
    assert ckpt.find_resume_point(points).tag == "epoch-001"
    assert (points / "latest").read_text() == "epoch-001"


def test_disk_full_while_writing_best_keeps_the_previous_best_model(shards, tmp_path, monkeypatch, capsys):
    """best/ is written into best.staging and swapped in: a full disk there names the staging path, says the
    previous best model stays valid (not "no earlier checkpoint"), frees the torn staging copy, and the old
    best/ still exports."""
    saves = {"best": 0}

    def second_best(tag: str) -> bool:
        saves["best"] += tag == "best"
        return tag == "best" and saves["best"] == 2

    _fill_the_disk_when(monkeypatch, second_best)
    monkeypatch.setattr(loop, "improves", lambda value, best: True)  # every epoch writes best/
    assert train_main.main(_args(shards, tmp_path / "runs", "bestfull", 3)) == 1
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "bestfull"
    assert "No space left on device while writing" in err and str(run / "best.staging") in err
    assert f"the previous best model {run / 'best'} stays valid" in err and "MiB" in err
    assert not (run / "best.staging").exists()
    from carat import export

    assert export.main(["--checkpoint", str(run / "best"), "--out", str(tmp_path / "m.pt")]) == 0


@pytest.mark.slow
def test_a_ray_rerun_with_another_model_is_refused_by_the_driver_before_ray_starts(finished, shards, tmp_path,
                                                                                   capsys):
    run = tmp_path / "runs" / "rayrun"
    ray_checkpoint = run / "checkpoint_2026-01-01_00-00-00.000000"  # what Ray keeps of a reported epoch
    shutil.copytree(finished / "checkpoints" / "epoch-002", ray_checkpoint / "epoch-002")
    (ray_checkpoint / "latest").write_text("epoch-002")
    args = _args(shards, tmp_path / "runs", "rayrun", 3, "--model.hidden_size=32", "--model.num_heads=4")
    args[args.index("none")] = "ray"
    code = train_main.main(args)
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot resume {ray_checkpoint / 'epoch-002'}" in err and "model.hidden_size: 16 -> 32" in err
    assert not (run / "config.toml").exists()
