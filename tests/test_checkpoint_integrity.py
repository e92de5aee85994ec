"""Issue 26, items 2, 3 and 7: a checkpoint is what was saved or an error.

Tags record each file's sha256 in ``carat_complete.json``; resume, export, evaluate, predict and ensemble
scoring verify them (a damaged tag falls back to the previous complete one with a warning naming the file;
nothing to fall back to is an error). Loaded weights and optimizer states must be finite. An ensemble member's
best is its best or an error. A full disk while checkpointing says so, naming the file."""

from __future__ import annotations

import errno
import json
import sys
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carat import evaluate, export, predict
from carat.train import __main__ as train_main
from carat.train import checkpoint as ckpt

OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL_FILE = "mp_rank_00_model_states.pt"


# -- the file logic, without DeepSpeed --------------------------------------------------------------------
def _sealed_tag(root: Path, tag: str, epoch: int = 0, hashes: bool = True) -> Path:
    """A tag as carat writes it: files, then the marker with their sizes (and, unless ``hashes`` is off as in
    an older carat, their sha256)."""
    tag_dir = root / tag
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"model.w": torch.arange(64.0)}, "epoch": epoch, "record": {}}, tag_dir / MODEL_FILE)
    torch.save({"state": {0: {"exp_avg": torch.ones(32)}}}, tag_dir / OPTIM_FILE)
    (tag_dir / "rng_rank0.pt").write_bytes(bytes(range(256)) * 4)
    files = ckpt.list_tag_files(tag_dir)
    ckpt.write_completion_marker(tag_dir, files, {"epoch": epoch},
                                 ckpt.seal_files(tag_dir, list(files)) if hashes else None)
    ckpt.write_latest(root, tag)
    return tag_dir


def _flip(path: Path, offset: int, mask: int = 0xFF, count: int = 1) -> None:
    """XOR ``count`` bytes from ``offset`` with ``mask``: a same-size corruption that sizes cannot see."""
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= mask
    path.write_bytes(bytes(data))


def test_the_marker_records_a_sha256_of_every_file(tmp_path):
    import hashlib

    tag = _sealed_tag(tmp_path, "epoch-001")
    marker = json.loads((tag / ckpt.COMPLETE_FILE).read_text())
    assert marker["format"] == 2 and set(marker["sha256"]) == set(marker["files"]) == {
        MODEL_FILE, OPTIM_FILE, "rng_rank0.pt"}
    for name, digest in marker["sha256"].items():
        assert digest == hashlib.sha256((tag / name).read_bytes()).hexdigest()
    assert ckpt.incomplete_reason(tag) is None and ckpt.unhashed_note(tag) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from([MODEL_FILE, OPTIM_FILE, "rng_rank0.pt"]), where=st.floats(0, 1, exclude_max=True),
       mask=st.integers(1, 255))
def test_any_flipped_byte_in_any_file_of_a_tag_is_detected_and_named(tmp_path, name, where, mask):
    root = tmp_path / f"{name}-{where}-{mask}"
    shutil.rmtree(root, ignore_errors=True)
    tag = _sealed_tag(root, "epoch-001")
    size = (tag / name).stat().st_size
    _flip(tag / name, int(where * size), mask)
    reason = ckpt.incomplete_reason(tag)
    assert reason is not None and name in reason and "sha256" in reason


def test_a_damaged_newest_tag_falls_back_to_the_previous_one_with_a_warning_naming_the_file(tmp_path):
    _sealed_tag(tmp_path, "epoch-001", 1)
    newest = _sealed_tag(tmp_path, "epoch-002", 2)
    _flip(newest / OPTIM_FILE, 300, count=16)
    point = ckpt.find_resume_point(tmp_path)
    assert point.tag == "epoch-001"
    assert f"{tmp_path / 'epoch-002'}: {OPTIM_FILE}" in point.warning() and "sha256" in point.warning()
    _flip(tmp_path / "epoch-001" / MODEL_FILE, 10)
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint in .* is damaged"):
        ckpt.find_resume_point(tmp_path)


def test_tags_of_an_older_carat_without_hashes_are_checked_by_size_with_a_note(tmp_path):
    tag = _sealed_tag(tmp_path, "epoch-001", hashes=False)
    assert json.loads((tag / ckpt.COMPLETE_FILE).read_text())["format"] == 1
    assert ckpt.incomplete_reason(tag) is None
    assert "no content hashes" in ckpt.unhashed_note(tag) and "sizes" in ckpt.unhashed_note(tag)
    os.truncate(tag / OPTIM_FILE, 10)
    assert "truncated" in ckpt.incomplete_reason(tag)


def test_non_finite_values_in_a_loaded_checkpoint_file_are_a_named_error(tmp_path):
    path = tmp_path / OPTIM_FILE
    exp_avg = torch.ones(8)
    exp_avg[3] = float("nan")
    torch.save({"base_optimizer_state": {"state": {0: {"exp_avg": exp_avg, "step": torch.tensor(2)}}},
                "fp32": [torch.tensor([1.0, float("inf")])], "ints": torch.arange(3)}, path)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint_file(path)
    message = str(info.value)
    assert str(path) in message and "non-finite" in message
    assert "base_optimizer_state.state.0.exp_avg" in message and "fp32.0" in message
    # DeepSpeed's own loads (resume, best/, zero_to_fp32) go through safe_torch_load: the same check
    with ckpt.safe_torch_load(), pytest.raises(ckpt.CheckpointError, match="exp_avg"):
        torch.load(path, weights_only=False)
    torch.save({"fine": torch.ones(3), "half": torch.ones(2, dtype=torch.bfloat16)}, path)
    assert ckpt.load_checkpoint_file(path)["fine"].sum() == 3
    # an exported model file: evaluate and predict read it through load_model
    exported = tmp_path / "model.pt"
    torch.save({"state_dict": {"heads.w": torch.tensor([0.5, float("nan")])}, "config": {}}, exported)
    with pytest.raises(ckpt.CheckpointError, match=r"model\.pt: non-finite values .* in heads\.w"):
        export.load_model(exported)


def _tiny_tmpfs(path: Path, size: str) -> Path:
    """A tmpfs of ``size`` at ``path`` (needs root and mount); skips the test elsewhere."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a tiny tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return path


@pytest.fixture
def full_disk(tmp_path):
    disk = _tiny_tmpfs(tmp_path / "disk", "256k")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_torch_save_on_a_full_disk_raises_no_space_naming_the_file(full_disk):
    """torch.save itself says `unexpected pos 128 vs 0` (a RuntimeError, no errno): carat's saves say ENOSPC."""
    target = full_disk / "epoch-001" / "rng_rank0.pt"
    target.parent.mkdir()
    with pytest.raises(RuntimeError, match="unexpected pos|write"):
        torch.save({"x": torch.zeros(200_000)}, target)
    with pytest.raises(OSError) as info:
        ckpt.save_torch(({"x": torch.zeros(200_000)}), target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    with pytest.raises(ckpt.CheckpointError) as caught:
        with ckpt.checkpoint_write_errors(full_disk, "epoch-001"), ckpt.torch_save_reports_os_errors():
            torch.save({"x": torch.zeros(200_000)}, str(target))  # as DeepSpeed calls it
    message = str(caught.value)
    assert message.startswith(f"No space left on device while writing {target}") and "\n" not in message


# -- the real loop, one process ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tests.data_fixtures import tiny_loop_corpus

    return tiny_loop_corpus(tmp_path_factory.mktemp("corpus") / "shards")


def _args(shards: Path, storage: Path, name: str, epochs: int = 3, *extra: str) -> list[str]:
    from tests.data_fixtures import loop_args

    return loop_args(shards, storage, name, epochs, "--train.keep_checkpoints=3", *extra)


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    storage = tmp_path_factory.mktemp("runs")
    assert train_main.main(_args(shards, storage, "done")) == 0
    return storage / "done"


def _interrupted_copy(finished: Path, tmp_path: Path) -> Path:
    """The finished run as a kill after epoch 3's checkpoint left it: no results yet."""
    run = tmp_path / "runs" / "done"
    shutil.copytree(finished, run)
    for name in ("results.json", "results.txt"):
        (run / name).unlink()
    return run


def _all_finite(run: Path, tmp_path: Path) -> bool:
    out = tmp_path / "exported.pt"
    assert export.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    return all(torch.isfinite(v).all() for v in torch.load(out)["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("name", [OPTIM_FILE, MODEL_FILE])
def test_a_same_size_flip_in_the_newest_tag_resumes_from_the_previous_one(finished, shards, tmp_path, capsys,
                                                                          name):
    run = _interrupted_copy(finished, tmp_path)
    damaged = run / "checkpoints" / "epoch-003"
    _flip(damaged / name, (damaged / name).stat().st_size // 2, count=16)
    assert train_main.main(_args(shards, tmp_path / "runs", "done")) == 0
    out = capsys.readouterr().out
    assert f"{damaged}: {name} does not match its sha256" in out
    assert f"resumed from {run / 'checkpoints' / 'epoch-002'}" in out
    # epoch 3 trained again from epoch 2: the uninterrupted run's result, and nothing non-finite spread
    a = json.loads((finished / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert b["test"]["micro_f1"] == pytest.approx(a["test"]["micro_f1"], abs=1e-9)
    assert any(name in w and "sha256" in w for w in b["warnings"])
    assert ckpt.incomplete_reason(damaged) is None  # rewritten whole
    assert _all_finite(run, tmp_path)


@pytest.mark.slow
def test_export_evaluate_and_predict_refuse_a_damaged_best_and_name_the_file(finished, shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    best_file = run / "best" / "best" / OPTIM_FILE
    _flip(best_file, 1000, count=16)
    out = tmp_path / "m.pt"
    for command in (lambda: export.main(["--checkpoint", str(run), "--out", str(out)]),
                    lambda: evaluate.main(["--checkpoint", str(run), "--split", "test"]),
                    lambda: predict.main(["--checkpoint", str(run), "--shards", str(shards),
                                          "--out", str(tmp_path / "p.json")])):
        assert command() == 1
        err = capsys.readouterr().err
        assert f"{OPTIM_FILE} does not match its sha256" in err and str(run / "best" / "best") in err
        assert err.count("\n") == 1, err  # one line
    assert not out.exists()
    # an explicit damaged tag is an error; the newest tag of a checkpoints folder falls back with a warning
    _flip(run / "checkpoints" / "epoch-003" / MODEL_FILE, 500)
    assert export.main(["--checkpoint", str(run / "checkpoints"), "--tag", "epoch-003", "--out", str(out)]) == 1
    assert f"{MODEL_FILE} does not match its sha256" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(run / "checkpoints"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"epoch-003: {MODEL_FILE} does not match its sha256" in captured.err
    assert torch.load(out)["source"]["tag"] == "epoch-002"


def _reseal(tag_dir: Path) -> None:
    """Rewrite a tag's marker for its current files: what a run that saved these very bytes would have written."""
    marker = json.loads((tag_dir / ckpt.COMPLETE_FILE).read_text())
    files = ckpt.list_tag_files(tag_dir)
    info = {k: v for k, v in marker.items() if k not in ("format", "tag", "files", "sha256")}
    ckpt.write_completion_marker(tag_dir, files, info, ckpt.seal_files(tag_dir, list(files)))


@pytest.mark.slow
def test_non_finite_weights_or_optimizer_state_saved_as_such_are_refused_by_name(finished, shards, tmp_path, capsys):
    run = _interrupted_copy(finished, tmp_path)
    tag = run / "checkpoints" / "epoch-003"
    state = torch.load(tag / OPTIM_FILE, weights_only=False)
    fp32 = state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    with torch.no_grad():
        fp32[5] = float("nan")
    torch.save(state, tag / OPTIM_FILE)
    _reseal(tag)  # the hashes match: only the finiteness check can see it
    assert train_main.main(_args(shards, tmp_path / "runs", "done")) == 1
    err = capsys.readouterr().err
    assert str(tag / OPTIM_FILE) in err and "non-finite" in err and "single_partition_of_fp32_groups" in err
    assert not (run / "results.json").exists()
    best = run / "best" / "best"
    model = torch.load(best / MODEL_FILE, weights_only=False)
    key = "model.text_encoder.embedding.position_embedding.weight"  # where the issue found NaN
    with torch.no_grad():
        model["module"][key].view(-1)[0] = float("inf")
    torch.save(model, best / MODEL_FILE)
    _reseal(best)
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and key in err and not (tmp_path / "m.pt").exists()


@pytest.mark.slow
def test_disk_full_while_checkpointing_says_no_space_and_where(shards, tmp_path, capsys):
    """A real full disk (a tiny tmpfs): the loop's one-line error, not torch's `unexpected pos`."""
    disk = _tiny_tmpfs(tmp_path / "disk", "900k")
    try:
        code = train_main.main(_args(shards, disk, "full", 3))
        err = capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert code == 1
    assert "No space left on device while writing " in err and "unexpected pos" not in err, err
    assert err.count("\n") == 1, err


def test_ray_resumes_its_newest_checkpoint_only_so_a_damaged_one_is_named(tmp_path):
    run = tmp_path / "run"
    _sealed_tag(run / "checkpoint_2026-01-01_00-00-00.000000", "epoch-001", 1)
    newest = _sealed_tag(run / "checkpoint_2026-01-01_00-01-00.000000", "epoch-002", 2)
    assert ckpt.damaged_ray_checkpoint(run) is None
    _flip(newest / MODEL_FILE, 100)
    reason = ckpt.damaged_ray_checkpoint(run)
    assert reason.startswith(f"Ray's newest checkpoint {newest} is damaged: {MODEL_FILE} does not match its sha256")
    assert ckpt.damaged_ray_checkpoint(tmp_path / "nothing") is None


def test_a_damaged_newest_ray_checkpoint_falls_back_to_the_newest_intact_earlier_one(tmp_path):
    run = tmp_path / "run"
    oldest = _sealed_tag(run / "checkpoint_2026-01-01_00-00-00.000000", "epoch-001", 1).parent
    middle = _sealed_tag(run / "checkpoint_2026-01-01_00-01-00.000000", "epoch-002", 2).parent
    newest = _sealed_tag(run / "checkpoint_2026-01-01_00-02-00.000000", "epoch-003", 3).parent
    assert ckpt.usable_ray_checkpoint(newest, run) == newest
    _flip(newest / "epoch-003" / MODEL_FILE, 100)
    _flip(middle / "epoch-002" / OPTIM_FILE, 100)
    assert ckpt.earlier_ray_checkpoint(run) == oldest
    assert ckpt.usable_ray_checkpoint(newest, run) == oldest  # the middle one is damaged too
    _flip(oldest / "epoch-001" / MODEL_FILE, 100)
    assert ckpt.earlier_ray_checkpoint(run) is None
    assert ckpt.usable_ray_checkpoint(newest, run) == newest  # nothing intact: the loop names the damage


@pytest.mark.slow
def test_a_ray_rerun_resumes_from_the_earlier_checkpoint_when_the_newest_is_damaged(shards, tmp_path):
    from tests.test_train_e2e import cpu_env, run_module

    args = [sys.executable, "-m", "carat.train", *_args(shards, tmp_path / "runs", "ray", 2)]
    args[args.index("none")] = "ray"
    args += ["--train.num_workers=1"]
    first = run_module(args, cpu_env())
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "ray"
    ray_dirs = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(ray_dirs) == 2
    newest_tag = next(p for p in ray_dirs[-1].iterdir() if p.name.startswith("epoch-"))
    _flip(newest_tag / MODEL_FILE, 4000, count=16)
    (run / "results.json").unlink()
    again = run_module(args, cpu_env())  # the same run again: its last epoch is retrained from epoch 1's state
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Ray's newest checkpoint {newest_tag} is damaged" in again.stderr
    assert f"resuming from the earlier {ray_dirs[0]}" in again.stderr
    assert f"resumed from {ray_dirs[0] / 'epoch-001'} after epoch 1" in again.stdout
    assert json.loads((run / "results.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_a_ray_rerun_on_a_damaged_newest_checkpoint_is_refused_before_ray_starts(finished, shards, tmp_path, capsys):
    run = tmp_path / "runs" / "rayrun"
    ray_checkpoint = run / "checkpoint_2026-01-01_00-00-00.000000"  # what Ray keeps of a reported epoch
    shutil.copytree(finished / "checkpoints" / "epoch-002", ray_checkpoint / "epoch-002")
    (ray_checkpoint / "latest").write_text("epoch-002")
    _flip(ray_checkpoint / "epoch-002" / OPTIM_FILE, 4000, count=16)
    args = _args(shards, tmp_path / "runs", "rayrun")
    args[args.index("none")] = "ray"
    assert train_main.main(args) == 1
    err = capsys.readouterr().err
    assert f"Ray's newest checkpoint {ray_checkpoint / 'epoch-002'} is damaged: {OPTIM_FILE}" in err
    assert not (run / "config.toml").exists()


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_of_a_real_deepspeed_tag_is_caught_and_resume_falls_back(finished, tmp_path, data):
    """The same property on the files DeepSpeed and the loop really write: whichever file, offset and bits."""
    points = tmp_path / "points"
    shutil.rmtree(points, ignore_errors=True)
    for tag in ("epoch-002", "epoch-003"):
        shutil.copytree(finished / "checkpoints" / tag, points / tag)
    newest = points / "epoch-003"
    name = data.draw(st.sampled_from(sorted(ckpt.list_tag_files(newest))), label="file")
    size = (newest / name).stat().st_size
    offset = data.draw(st.integers(0, size - 1), label="offset")
    _flip(newest / name, offset, data.draw(st.integers(1, 255), label="mask"))
    assert name in ckpt.incomplete_reason(newest)
    point = ckpt.find_resume_point(points)
    assert point.tag == "epoch-002" and f"epoch-003: {name} does not match its sha256" in point.warning()
