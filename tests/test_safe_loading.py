"""Issue 10, part 4: nothing carat loads can run code. A crafted checkpoint file whose unpickling would write
a file is refused by export, evaluate, predict and resume, with an error naming the file; the file is never
written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carat import evaluate, export, predict
from carat.train import checkpoint as ckpt


class Payload:
    """Unpickling this calls ``open(target, 'w').write(...)``: what an attacker's checkpoint would do."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('code ran')",))


def _malicious_tag(root: Path, tag: str, target: Path) -> Path:
    tag_dir = root / tag
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"model.w": torch.zeros(1)}, "config": {}, "epoch": 1, "evil": Payload(target)},
               tag_dir / "mp_rank_00_model_states.pt")
    torch.save({"python": Payload(target)}, tag_dir / "rng_rank0.pt")
    ckpt.write_completion_marker(tag_dir, ckpt.list_tag_files(tag_dir), {"epoch": 1})
    ckpt.write_latest(root, tag)
    return tag_dir


def test_the_payload_really_runs_under_a_plain_unpickle(tmp_path):
    target = tmp_path / "pwned"
    tag = _malicious_tag(tmp_path / "ck", "epoch-001", target)
    torch.load(tag / "rng_rank0.pt", weights_only=False)  # the unsafe load the old code did
    assert target.read_text() == "code ran"


def test_checkpoint_files_load_with_weights_only_and_name_the_file(tmp_path):
    target = tmp_path / "pwned"
    tag = _malicious_tag(tmp_path / "ck", "epoch-001", target)
    for name in ("mp_rank_00_model_states.pt", "rng_rank0.pt"):
        with pytest.raises(ckpt.CheckpointError, match=f"{name}: refused to load"):
            ckpt.load_checkpoint_file(tag / name)
    # DeepSpeed's own loaders ask for weights_only=False; inside safe_torch_load they cannot get it
    with ckpt.safe_torch_load(), pytest.raises(Exception):
        torch.load(tag / "rng_rank0.pt", weights_only=False)
    assert not target.exists()


def test_export_evaluate_and_predict_refuse_a_crafted_checkpoint(tmp_path, capsys):
    target = tmp_path / "pwned"
    root = tmp_path / "ck"
    _malicious_tag(root, "epoch-001", target)
    assert export.main(["--checkpoint", str(root), "--out", str(tmp_path / "m.pt")]) == 1
    assert "refused to load" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(root)]) == 1
    assert "mp_rank_00_model_states.pt: refused to load" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(root), "--npz", "x.npz", "--out", str(tmp_path / "p.json")]) == 1
    assert "refused to load" in capsys.readouterr().err
    evil_export = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "config": {}, "x": Payload(target)}, evil_export)
    assert evaluate.main(["--checkpoint", str(evil_export)]) == 1
    assert "not a readable carat export" in capsys.readouterr().err
    assert not target.exists() and not (tmp_path / "m.pt").exists()


def test_a_torn_checkpoint_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    root = tmp_path / "ck"
    tag = root / "epoch-001"
    tag.mkdir(parents=True)
    torch.save({"module": {}}, tag / "mp_rank_00_model_states.pt")
    ckpt.write_completion_marker(tag, ckpt.list_tag_files(tag), {"epoch": 1})
    os.truncate(tag / "mp_rank_00_model_states.pt", 20)
    assert export.main(["--checkpoint", str(root), "--tag", "epoch-001", "--out", str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert "incomplete checkpoint" in err and "truncated" in err
    (tag / ckpt.COMPLETE_FILE).unlink()  # a checkpoint from before markers: the unreadable file is named
    assert evaluate.main(["--checkpoint", str(root / "epoch-001")]) == 1
    assert "unreadable checkpoint file" in capsys.readouterr().err


def test_resume_refuses_a_crafted_checkpoint_before_any_code_runs(tmp_path, capsys):
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus
    from carat.train import __main__ as train_main

    shards = tmp_path / "shards"
    synthesize_corpus(shards, SynthConfig(scale=0.003, length_scale=0.03, seed=2),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    target = tmp_path / "pwned"
    _malicious_tag(tmp_path / "runs" / "evil" / "checkpoints", "epoch-001", target)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    code = train_main.main(["--preset", "tiny", f"--train.shard_dir={shards}",
                            f"--train.storage_path={tmp_path / 'runs'}", "--train.run_name=evil",
                            "--train.epochs=2", "--loader.num_workers=0", "--launcher", "none"])
    assert code == 1
    assert "mp_rank_00_model_states.pt: refused to load" in capsys.readouterr().err
    assert not target.exists()
    assert not (tmp_path / "runs" / "evil" / "config.toml").exists()  # refused before anything was written


def test_a_plain_pt_labels_file_needs_no_trust_but_a_pickle_does(tmp_path):
    from carat.data.sources.pickles import _unpickle
    from carat.errors import DataError

    plain = tmp_path / "labels.pt"
    torch.save({"train": torch.zeros(2, 6)}, plain)
    assert _unpickle(plain, trust=False)["train"].shape == (2, 6)
    evil = tmp_path / "evil.pt"
    torch.save({"train": Payload(tmp_path / "pwned")}, evil)
    with pytest.raises(DataError, match="refusing to unpickle"):
        _unpickle(evil, trust=False)
    assert not (tmp_path / "pwned").exists()


def test_resume_refuses_crafted_optimizer_states_in_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """The optimizer states are loaded inside DeepSpeed's engine, not by carat's pre-check: a crafted file there
    must still end the run with carat's one line naming it (it was a raw `[rank0]` traceback), and never run."""
    from carat.data.corpus.shards import StorageConfig
    from carat.data.sources.synth import SynthConfig, synthesize_corpus
    from carat.train import __main__ as train_main
    from tests.faults import fault_env

    shards = tmp_path / "shards"
    synthesize_corpus(shards, SynthConfig(scale=0.003, length_scale=0.03, seed=2),
                      StorageConfig(dtype="float32", shard_max_samples=16), reference=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    args = ["--preset", "tiny", f"--train.shard_dir={shards}", f"--train.storage_path={tmp_path / 'runs'}",
            "--train.run_name=evil", "--train.epochs=2", "--loader.num_workers=0", "--launcher", "none"]
    # a run that died after its first epoch's checkpoint (in a child: the fault exits the process)
    died = subprocess.run([sys.executable, "-m", "carat.train", *args], capture_output=True, text=True,
                          timeout=600, env=fault_env("1:0"))
    assert died.returncode == 17, died.stderr[-2000:]
    tag = tmp_path / "runs" / "evil" / "checkpoints" / "epoch-001"
    (optim,) = tag.glob("*optim_states.pt")
    target = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": Payload(target)}, optim)
    ckpt.write_completion_marker(tag, ckpt.list_tag_files(tag), {"epoch": 1})
    capsys.readouterr()
    assert train_main.main(args) == 1
    err = capsys.readouterr().err
    assert f"{optim}: refused to load" in err and "[rank0]" not in err and "Traceback" not in err
    assert not target.exists()
