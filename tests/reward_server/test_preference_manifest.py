"""User preference manifests: good rows load, bad rows are skipped and counted with their line."""

import json

import pytest
from PIL import Image

from posterrl.data.manifest import ManifestError
from reward_server.preference_manifest import load_preference_manifest


def test_good_and_bad_rows(tmp_path):
    for name, colour in (("in.png", (10, 10, 10)), ("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        Image.new("RGB", (8, 12), colour).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = {"id": "p1", "task": "filling", "instruction": "fill it", "inputs": ["in.png"], "chosen": "a.png",
            "rejected": "b.png"}
    rows = [
        json.dumps(good),
        json.dumps({**good, "id": "p2", "tie": True}),
        "{not json",
        json.dumps({k: v for k, v in good.items() if k != "chosen"}),
        json.dumps({**good, "task": "painting"}),
        json.dumps({**good, "rejected": "missing.png"}),
        json.dumps({**good, "chosen": "broken.png"}),
        json.dumps({**good, "inputs": "in.png"}),
        json.dumps({**good, "tie": "yes"}),
        "",
    ]
    manifest = tmp_path / "prefs.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    pairs, skipped, reasons = load_preference_manifest(manifest)
    assert [p.pair_id for p in pairs] == ["p1", "p2"]
    assert pairs[0].chosen.getpixel((0, 0)) == (200, 0, 0) and pairs[0].rejected.size == (8, 12)
    assert [p.tie for p in pairs] == [False, True] and {p.source for p in pairs} == {"manifest"}
    assert pairs[0].gold_margin is None
    assert skipped == 7
    expected = [(3, "not valid JSON"), (4, "missing keys ['chosen']"), (5, "unknown task 'painting'"),
                (6, "missing.png does not exist"), (7, "broken.png is unreadable"),
                (8, "'inputs' must be a non-empty list"), (9, "'tie' must be true or false")]
    for reason, (line, text) in zip(reasons, expected):
        assert reason.startswith(f"{manifest}:{line}:") and text in reason


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        load_preference_manifest(tmp_path / "nope.jsonl")


def _images(tmp_path):
    for name, colour in (("in.png", (10, 10, 10)), ("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    return {"id": "p1", "task": "filling", "instruction": "fill it", "inputs": ["in.png"], "chosen": "a.png",
            "rejected": "b.png"}


def test_duplicate_ids_and_self_pairs_are_skipped_and_counted(tmp_path):
    good = _images(tmp_path)
    rows = [good, {**good, "chosen": "b.png", "rejected": "a.png"},  # p1 again
            {**good, "id": "same", "rejected": "a.png"},
            {**good, "id": "same-abs", "rejected": str(tmp_path / "a.png")},
            {**good, "id": "p2"}]
    manifest = tmp_path / "prefs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, skipped, reasons = load_preference_manifest(manifest)
    assert [p.pair_id for p in pairs] == ["p1", "p2"] and skipped == 3
    assert reasons[0] == f"{manifest}:2: duplicate id 'p1' (first seen on line 1)"
    assert reasons[1].startswith(f"{manifest}:3: 'chosen' and 'rejected' are the same image")
    assert reasons[2].startswith(f"{manifest}:4: 'chosen' and 'rejected' are the same image")


def test_manifest_without_a_usable_pair_is_an_error(tmp_path):
    good = _images(tmp_path)
    manifest = tmp_path / "prefs.jsonl"
    manifest.write_text(json.dumps({**good, "rejected": "a.png"}) + "\n{torn\n")
    with pytest.raises(ManifestError, match="prefs.jsonl has no usable pair \\(2 rows skipped\\)") as error:
        load_preference_manifest(manifest)
    assert "prefs.jsonl:1: 'chosen' and 'rejected' are the same image" in str(error.value)
    assert "prefs.jsonl:2: not valid JSON" in str(error.value)
    manifest.write_text("\n")
    with pytest.raises(ManifestError, match="no usable pair"):
        load_preference_manifest(manifest)
    manifest.write_bytes(json.dumps(good).encode() + b"\n\xff\n")
    with pytest.raises(ManifestError, match="prefs.jsonl:2: not UTF-8"):
        load_preference_manifest(manifest)
