"""`--resume` with a config that differs from the run's config.yaml: refused, keys listed, before Ray starts."""

import pytest
import yaml

import actors.pipeline
from posterrl.cli import main
from posterrl.config import load_config
from posterrl.runlog import RunDir, config_differences

CONFIG = "configs/tiny.yaml"


class Connected(Exception):
    """Raised in place of connecting to Ray: the command got past its checks."""


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    def connect(*args, **kwargs):
        raise Connected

    monkeypatch.setattr(actors.pipeline, "connect", connect)
    RunDir(tmp_path / "run").create(load_config(CONFIG))
    return tmp_path / "run"


def test_differences_name_dotted_keys():
    saved = {"sft": {"lr": 1e-4, "steps": 3}, "reward": {"scorers": [{"name": "a", "weight": 1.0}]}, "stages": ["a"]}
    new = {"sft": {"lr": 5e-4, "steps": 3}, "reward": {"scorers": [{"name": "a", "weight": 0.5}]}, "stages": ["b"]}
    assert config_differences(saved, new) == ["reward.scorers[0].weight: 1.0 -> 0.5", "sft.lr: 0.0001 -> 0.0005"]


def test_resume_with_a_changed_config_is_refused(run_dir, capsys):
    before = (run_dir / "config.yaml").read_text()
    assert main(["run", CONFIG, "--run-dir", str(run_dir), "--resume", "sft.lr=0.5", "rl.epochs=7"]) == 2
    err = capsys.readouterr().out
    assert "sft.lr" in err and "rl.epochs" in err and "--force-config" in err and "config.yaml" in err
    assert (run_dir / "config.yaml").read_text() == before


def test_resume_with_the_same_config_or_forced_goes_on(run_dir, capsys):
    with pytest.raises(Connected):  # the same config (a stage command sets its own stages: not a change)
        main(["sft", CONFIG, "--run-dir", str(run_dir), "--resume"])
    with pytest.raises(Connected):
        main(["run", CONFIG, "--run-dir", str(run_dir), "--resume", "sft.lr=0.5", "--force-config"])
    assert "sft.lr" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["sft"]["lr"] == 0.5


def test_a_new_run_dir_is_not_compared(tmp_path, monkeypatch):
    monkeypatch.setattr(actors.pipeline, "connect", lambda *a, **k: (_ for _ in ()).throw(Connected()))
    with pytest.raises(Connected):
        main(["run", CONFIG, "--run-dir", str(tmp_path / "fresh"), "--resume", "sft.lr=0.5"])
