"""Crash-safe writes (posterrl/files.py) and the files that use them: a crash before the rename keeps the old file."""

import json
import os
import stat

import pytest
import torch

from posterrl.config import Config
from posterrl.files import write_atomic
from posterrl.policy import SPEC_FILE, EditPolicy
from posterrl.runlog import RunDir


class Crash(Exception):
    pass


def crash_on_replace(monkeypatch):
    def replace(src, dst):
        raise Crash(f"crash before renaming {src} to {dst}")

    monkeypatch.setattr(os, "replace", replace)


def test_write_atomic_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    write_atomic(tmp_path / "a.json", '{"x": 1}')
    assert (tmp_path / "a.json").read_text() == '{"x": 1}'
    assert str(tmp_path) in synced  # the folder, after the rename
    assert any(s.startswith(str(tmp_path / ".a.json.")) for s in synced)  # the temp file, before it
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_atomic_mode_and_default_umask(tmp_path):
    write_atomic(tmp_path / "secret", b"k", mode=0o600)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "plain", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644


def test_crash_keeps_the_old_config_and_summary(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run").create(Config())
    old_config, old_summary = run.config_path.read_text(), run.summary_path.read_text()
    crash_on_replace(monkeypatch)
    config = Config()
    config.data.seed = 12345
    with pytest.raises(Crash):
        run.create(config)
    with pytest.raises(Crash):
        run.record_gold("x", {"t": 1.0})
    assert run.config_path.read_text() == old_config
    assert run.summary_path.read_text() == old_summary
    assert not [p for p in run.root.iterdir() if p.name.endswith(".tmp")]


def test_crash_mid_export_keeps_the_old_policy(tiny_config, tmp_path, monkeypatch):
    policy = EditPolicy.from_config(tiny_config.model, tiny_config.rollout)  # its own: changed below
    export = policy.save_pretrained(tmp_path / "policy")
    before = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    monkeypatch.setattr(type(policy.tokenizer), "save_pretrained",
                        lambda self, d: (_ for _ in ()).throw(Crash("crash mid-export")))
    with pytest.raises(Crash):
        policy.save_pretrained(export)
    after = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    assert after == before
    assert json.loads((export / SPEC_FILE).read_text())
    EditPolicy.from_pretrained(export)  # still a complete export
