"""The data and config commands, driven through the real entry point in-process."""

import pytest
from PIL import Image

from posterrl.cli import main
from posterrl.data.manifest import load_manifest
from posterrl.data.tasks import TASKS


def test_data_generate_then_show(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path / "d"), "--n", "2", "--seed", "4", "--size", "48"]) == 0
    rows = load_manifest(tmp_path / "d" / "manifest.jsonl", require_target=True).rows
    assert len(rows) == 2 * len(TASKS)
    assert max(rows[0].load_target().size) == 48
    assert main(["data", "show", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "identity-driven: 2" in out and "total: 12" in out
    with Image.open(tmp_path / "d" / "contact_sheet.png") as sheet:
        assert sheet.width > 0


def test_data_generate_rejects_unknown_task(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path), "--n", "1", "--tasks", "filing"]) == 2
    assert "--tasks ['filing']" in capsys.readouterr().out


def test_data_show_reports_bad_rows(tmp_path, capsys):
    main(["data", "generate", "--out", str(tmp_path), "--n", "1", "--tasks", "filling"])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + '{"id": "x", "task": "filling"}\n')
    assert main(["data", "show", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 of 2 rows" in out and "total: 1" in out


def test_config_command_validates_and_prints_sizes(capsys):
    assert main(["config", "configs/tiny.yaml", "rollout.group_size=6"]) == 0
    out = capsys.readouterr().out
    assert "group_size: 6" in out and "image tokens per canvas: 64" in out and "valid" in out
    assert main(["config", "configs/tiny.yaml", "rollout.gruop_size=6"]) == 2
    assert "did you mean 'rollout.group_size'?" in capsys.readouterr().out


def test_sample_needs_a_source():
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", "x", "--out", "y"])
