"""What `pip install .` ships: a non-editable wheel carries every file carat reads at run time, and the
project metadata matches what carat needs (Python floor for tomllib, the tested Ray, runtime dependencies)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _dependency(name: str) -> str:
    matches = [d for d in PYPROJECT["project"]["dependencies"] if d.split("[")[0].split(">")[0].strip() == name]
    assert matches, f"{name} is not a runtime dependency"
    return matches[0]


def test_python_floor_covers_tomllib():
    # carat/config.py imports tomllib (3.11+); the floor must say so.
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)


def test_ray_floor_is_the_tested_version():
    import ray

    spec = _dependency("ray")
    assert spec.endswith(">=2.60") and "tune" in spec and "train" in spec and "default" in spec
    assert tuple(int(x) for x in ray.__version__.split(".")[:2]) >= (2, 60)


def test_runtime_imports_are_runtime_dependencies():
    # card.py (synthesis, prepare, the quickstart) needs scikit-learn; the tune's default searcher needs optuna.
    assert "sklearn" in (REPO / "carat/data/corpus/card.py").read_text()
    _dependency("scikit-learn")
    _dependency("optuna")
    assert not any(d.startswith("scikit-learn") for d in PYPROJECT["project"]["optional-dependencies"]["test"])


def test_console_scripts():
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["carat-tune"] == "carat.tune.__main__:main"
    assert scripts["carat-train"] == "carat.train.__main__:main"


def test_no_runtime_data_outside_the_package():
    # ds_configs/ used to sit beside the package, where a wheel cannot reach it. The checkout's top-level
    # ds_configs/ (what `--train.ds_config ds_configs/zero2.json` names) is now a link to the package data,
    # so there is one copy and the two cannot drift apart.
    top = REPO / "ds_configs"
    assert top.is_symlink() and top.resolve() == (REPO / "carat/ds_configs").resolve()
    assert sorted(p.name for p in (REPO / "carat/ds_configs").glob("*.json"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-w", str(out), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("carat-*.whl")
    return path


def test_wheel_carries_every_runtime_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"carat/{p.relative_to(REPO / 'carat').as_posix()}" for p in (REPO / "carat").rglob("*")
               if p.is_file() and p.suffix in (".json", ".toml", ".yaml", ".txt") and "__pycache__" not in p.parts}
    assert shipped and shipped <= names, shipped - names
    assert "carat/ds_configs/zero2.json" in names and "carat/data/sources/mosei_std_folds.json" in names
    assert "carat/tune/__main__.py" in names
    # An SPDX license expression (PEP 639): setuptools deprecates the table form with a 2027-02-18 deadline,
    # after which an isolated `pip install .` (the Dockerfile's) would stop building.
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_installed_wheel_finds_its_ds_configs_and_data(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import carat, json\n"
        "from pathlib import Path\n"
        "from carat.train.deepspeed_config import DS_CONFIG_DIR, default_ds_config_path, read_ds_config\n"
        f"assert Path(carat.__file__).is_relative_to({str(site)!r}), carat.__file__\n"
        "for stage in range(4): read_ds_config(default_ds_config_path(stage, False))\n"
        "read_ds_config(default_ds_config_path(3, True))\n"
        "from importlib import resources\n"
        "assert json.loads(resources.files('carat.data.sources').joinpath('mosei_std_folds.json').read_text())\n"
        "import carat.tune.__main__\n"
        "print('ok', DS_CONFIG_DIR)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(site) in proc.stdout
