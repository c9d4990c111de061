"""Manifest loading: good rows load, every bad row is skipped, counted and explained."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from posterrl.data.manifest import ManifestError, check_bad_fraction, load_manifest, summarize_skips, write_manifest


@pytest.fixture
def image_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "t"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(images / f"{name}.png")
    (images / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(64))
    return images


def _row(id_: str, **fields) -> dict:
    row = {"id": id_, "task": "filling", "instruction": "Fill it.", "inputs": ["images/a.png"],
           "target": "images/t.png", "meta": {"k": 1}}
    row.update(fields)
    return row


def _write_lines(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_mixed_manifest_keeps_good_rows_and_explains_bad_ones(tmp_path, image_dir):
    no_task = _row("no-task")
    del no_task["task"]
    lines = [
        json.dumps(_row("good-1")),                                                   # 1
        '{"id": "broken", "task": ',                                                  # 2 invalid JSON
        json.dumps(no_task),                                                          # 3
        json.dumps(_row("typo", task="filing")),                                      # 4
        json.dumps(_row("gone", inputs=["images/missing.png"])),                      # 5
        json.dumps(_row("garbage", inputs=["images/corrupt.png"])),                   # 6
        json.dumps(_row("not-a-list", inputs="images/a.png")),                        # 7
        "",                                                                           # blank lines are ignored
        json.dumps(_row("good-1", task="extending")),                                 # 9 duplicate id
        json.dumps(_row("good-2", task="layout-driven", inputs=["images/a.png", str(image_dir / "b.png")],
                        target=None, meta=None)),                                     # 10 absolute path, no target
    ]
    manifest = tmp_path / "manifest.jsonl"
    _write_lines(manifest, lines)
    load = load_manifest(manifest)

    assert [row.id for row in load.rows] == ["good-1", "good-2"]
    assert load.skipped == 7 and len(load.reasons) == 7
    expected = [
        ("line 2", "invalid JSON"),
        ("line 3 (id 'no-task')", "missing key 'task'"),
        ("line 4 (id 'typo')", "did you mean 'filling'"),
        ("line 5 (id 'gone')", "input image 'images/missing.png' does not exist"),
        ("line 6 (id 'garbage')", "input image 'images/corrupt.png' is not a readable image"),
        ("line 7 (id 'not-a-list')", "'inputs' must be a non-empty list"),
        ("line 9 (id 'good-1')", "duplicate id 'good-1' (first seen on line 1)"),
    ]
    for reason, (where, what) in zip(load.reasons, expected):
        assert f"manifest.jsonl {where}:" in reason and what in reason, reason

    good_1, good_2 = load.rows
    assert good_1.inputs == [image_dir / "a.png"] and good_1.target == image_dir / "t.png"
    assert good_1.meta == {"k": 1} and good_2.meta == {} and good_2.target is None
    assert good_2.inputs[1] == image_dir / "b.png"
    assert good_1.load_inputs()[0].size == (8, 8) and good_1.load_target().mode == "RGB"
    assert good_2.load_target() is None

    summary = summarize_skips(load, limit=2)
    assert summary.startswith(f"skipped 7 of 9 rows in {manifest}")
    assert "invalid JSON" in summary and "and 5 more" in summary and "did you mean" not in summary


def test_require_target_and_check_images_switches(tmp_path, image_dir):
    manifest = tmp_path / "manifest.jsonl"
    _write_lines(manifest, [json.dumps(_row("ok")), json.dumps(_row("untargeted", target=None)),
                            json.dumps(_row("missing-image", inputs=["images/nope.png"]))])
    strict = load_manifest(manifest, require_target=True)
    assert [row.id for row in strict.rows] == ["ok"]
    assert "missing key 'target'" in strict.reasons[0]
    unchecked = load_manifest(manifest, check_images=False)
    assert [row.id for row in unchecked.rows] == ["ok", "untargeted", "missing-image"]


def test_all_bad_manifest_raises_naming_the_file(tmp_path, image_dir):
    manifest = tmp_path / "bad.jsonl"
    _write_lines(manifest, ["not json", json.dumps(_row("x", task="filing"))])
    with pytest.raises(ManifestError, match="bad.jsonl") as error:
        load_manifest(manifest)
    assert "did you mean 'filling'" in str(error.value) and "invalid JSON" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_missing_manifest_raises_naming_the_path(tmp_path):
    with pytest.raises(ManifestError, match="nowhere.jsonl"):
        load_manifest(tmp_path / "nowhere.jsonl")


def test_write_manifest_round_trips(tmp_path, image_dir):
    rows = [_row("one"), _row("two", task="style-driven", inputs=["images/a.png", "images/b.png"])]
    write_manifest(rows, tmp_path / "manifest.jsonl")
    load = load_manifest(tmp_path / "manifest.jsonl", require_target=True)
    assert load.skipped == 0
    assert [(row.id, row.task, len(row.inputs)) for row in load.rows] == [("one", "filling", 1),
                                                                           ("two", "style-driven", 2)]


# ---------------------------------------------------------------- bad input that used to crash later


def test_non_utf8_manifest_is_an_error_naming_file_and_line(tmp_path, image_dir):
    manifest = tmp_path / "latin1.jsonl"
    manifest.write_bytes(json.dumps(_row("ok")).encode() + b"\n" + b'{"id": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(ManifestError, match=r"latin1.jsonl line 2 is not UTF-8"):
        load_manifest(manifest)
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(_row("ok")).encode() + b"\n")
    assert [row.id for row in load_manifest(with_bom).rows] == ["ok"]  # a UTF-8 byte-order mark is fine


def test_decompression_bomb_row_is_skipped_and_counted(tmp_path, image_dir, monkeypatch, bomb_png):
    bomb_png(image_dir / "bomb.png")  # its header claims 10^10 pixels: PIL raises DecompressionBombError
    Image.new("RGB", (12, 12)).save(image_dir / "big.png")
    manifest = tmp_path / "manifest.jsonl"
    _write_lines(manifest, [json.dumps(_row("ok")), json.dumps(_row("bomb", inputs=["images/bomb.png"])),
                            json.dumps(_row("big", target="images/big.png"))])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: over the limit, under twice it (a warning)
    load = load_manifest(manifest)
    assert [row.id for row in load.rows] == ["ok"] and load.skipped == 2
    assert "line 2 (id 'bomb'): input image 'images/bomb.png' is too large to open" in load.reasons[0]
    assert "line 3 (id 'big'): target image 'images/big.png' is too large to open" in load.reasons[1]


@pytest.mark.parametrize("aspect", [[0, 0], "wide", [-3, 4], [3], [3, 4, 5], [True, 1], [1, float("nan")],
                                    None, [3, "4"]])
def test_bad_target_aspect_row_is_skipped_and_counted(tmp_path, image_dir, aspect):
    manifest = tmp_path / "manifest.jsonl"
    _write_lines(manifest, [json.dumps(_row("ok", task="rescaling", meta={"target_aspect": [3, 4]})),
                            json.dumps(_row("bad", task="rescaling", meta={"target_aspect": aspect}))])
    load = load_manifest(manifest)
    assert [row.id for row in load.rows] == ["ok"] and load.skipped == 1
    assert "line 2 (id 'bad'): 'meta.target_aspect' must be [width, height], two numbers > 0" in load.reasons[0]


def test_rows_with_more_inputs_than_the_model_takes_are_skipped(tmp_path, image_dir):
    manifest = tmp_path / "manifest.jsonl"
    _write_lines(manifest, [json.dumps(_row("one")),
                            json.dumps(_row("three", inputs=["images/a.png", "images/b.png", "images/a.png"]))])
    assert len(load_manifest(manifest).rows) == 2  # the limit applies only where the model is known
    load = load_manifest(manifest, max_inputs=2)
    assert [row.id for row in load.rows] == ["one"]
    assert "line 2 (id 'three'): 3 input images, more than model.max_inputs=2" in load.reasons[0]


def test_too_many_bad_rows_stop_the_run(tmp_path, image_dir):
    manifest = tmp_path / "manifest.jsonl"
    _write_lines(manifest, [json.dumps(_row(f"ok-{i}")) for i in range(8)]
                 + [json.dumps(_row("typo", task="filing")), "not json"])
    load = load_manifest(manifest)
    assert (len(load.rows), load.skipped) == (8, 2)
    check_bad_fraction(load, 0.2)  # 20% bad: at the limit, goes on
    with pytest.raises(ManifestError) as error:
        check_bad_fraction(load, 0.1)
    message = str(error.value)
    assert f"manifest {manifest}: 2 of 10 rows are bad (20%), more than data.max_bad_fraction=0.1" in message
    assert "line 9 (id 'typo')" in message and "line 10: invalid JSON" in message
    clean = tmp_path / "clean.jsonl"
    _write_lines(clean, [json.dumps(_row("ok"))])
    check_bad_fraction(load_manifest(clean), 0.0)
