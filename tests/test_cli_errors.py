"""Every training-side command has --help and turns bad input into a one-line error and exit status 1
(2 is argparse's, for malformed command lines), as `python -m carat.data` does."""

from __future__ import annotations

import pytest

from carat import evaluate, export, predict
from carat.train import __main__ as train_main


@pytest.mark.parametrize("main", [train_main.main, evaluate.main, predict.main, export.main],
                         ids=["train", "evaluate", "predict", "export"])
def test_help_exits_zero(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_train_rejects_config_typos_before_starting_anything(capsys, tmp_path):
    assert train_main.main(["--launcher", "none", "--train.epocs=2"]) == 1
    assert "unknown key train.epocs" in capsys.readouterr().err
    assert train_main.main(["--config", str(tmp_path / "missing.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_train_without_shards_and_synthesis_disabled_says_what_to_do(capsys, tmp_path):
    code = train_main.main(["--launcher", "none", f"--train.shard_dir={tmp_path / 'none'}",
                            "--train.synth_if_missing=false"])
    assert code == 1
    assert "no manifest.parquet" in capsys.readouterr().err


def test_checkpoint_commands_name_the_bad_path(capsys, tmp_path):
    missing = tmp_path / "nothing"
    missing.mkdir()
    assert export.main(["--checkpoint", str(missing), "--out", str(tmp_path / "m.pt")]) == 1
    assert "holds no DeepSpeed checkpoint" in capsys.readouterr().err
    not_carat = tmp_path / "other.pt"
    import torch

    torch.save({"weights": 1}, not_carat)
    assert evaluate.main(["--checkpoint", str(not_carat)]) == 1
    assert "is not a carat export" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(not_carat), "--npz", "x.npz", "--out", str(tmp_path / "p.txt")]) == 1
    assert "use a .json or .csv" in capsys.readouterr().err


def test_show_config_documents_every_key(capsys):
    assert train_main.main(["--show-config", "--model.hidden_size=64", "--model.num_heads=4"]) == 0
    out = capsys.readouterr().out
    assert "hidden_size = 64" in out and "[optim]" in out and "[train]" in out
    assert "# Encoder width d" in out  # field docstrings become comments


@pytest.mark.parametrize("override, named", [
    ("--loss.pos_weight=[1.0, 2.0]", "loss.pos_weight has 2 values; model.num_classes=6"),
    ("--model.visual_dim=36", "model.visual_dim=36, but carat's visual features are 35-d"),
    ("--model.num_classes=5", "model.num_classes=5 needs one per label"),
])
def test_cross_section_mismatches_fail_before_any_run_directory(override, named, capsys, tmp_path):
    runs = tmp_path / "runs"
    code = train_main.main(["--launcher", "none", override, f"--train.storage_path={runs}"])
    assert code == 1
    assert named in capsys.readouterr().err
    assert not runs.exists()


def test_text_longer_than_the_position_table_fails_before_training(capsys, tmp_path):
    from tests.data_fixtures import tiny_loop_corpus

    shards = tiny_loop_corpus(tmp_path / "shards")
    runs = tmp_path / "runs"
    code = train_main.main(["--launcher", "none", f"--train.shard_dir={shards}", f"--train.storage_path={runs}",
                            "--model.text_max_positions=2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "more text steps than model.text_max_positions=2" in err and "text_overflow='truncate'" in err
    assert not (runs).exists() or not any(runs.iterdir())
