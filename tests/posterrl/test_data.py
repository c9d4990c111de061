"""Procedural posters and the six tasks: determinism, structure of every task's samples, contact sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from posterrl.data.manifest import load_manifest
from posterrl.data.posters import NEUTRAL_GRAY, STYLE_FAMILIES, canvas_size, sample_spec
from posterrl.data.render import render
from posterrl.data.sheet import PADDING, contact_sheet, task_counts
from posterrl.data.tasks import REGIME, TASKS, build_samples, generate_dataset

SIZE = 64
POSTERS = range(8)


@pytest.fixture(scope="module")
def samples_by_task():
    by_task: dict[str, list] = {task: [] for task in TASKS}
    for index in POSTERS:
        for sample in build_samples(index, seed=0, size=SIZE):
            by_task[sample.task].append(sample)
    return by_task


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _same_samples(a, b) -> None:
    assert [s.id for s in a] == [s.id for s in b]
    for x, y in zip(a, b):
        assert (x.task, x.instruction, x.meta) == (y.task, y.instruction, y.meta)
        assert len(x.inputs) == len(y.inputs)
        for p, q in zip(x.inputs + [x.target], y.inputs + [y.target]):
            assert np.array_equal(_pixels(p), _pixels(q))


def test_generate_dataset_is_deterministic(tmp_path):
    first = generate_dataset(tmp_path / "a", n=2, seed=7, progress=False)
    second = generate_dataset(tmp_path / "b", n=2, seed=7, progress=False)
    other = generate_dataset(tmp_path / "c", n=2, seed=8, progress=False)
    assert first.read_bytes() == second.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == 2 * len(TASKS)
    for row in rows:
        for name in row["inputs"] + [row["target"]]:
            a, b = Image.open(tmp_path / "a" / name), Image.open(tmp_path / "b" / name)
            assert np.array_equal(_pixels(a), _pixels(b)), name
    assert first.read_bytes() != other.read_bytes()
    target = rows[0]["target"]
    assert not np.array_equal(_pixels(Image.open(tmp_path / "a" / target)),
                              _pixels(Image.open(tmp_path / "c" / target)))


def test_chunked_generation_equals_one_pass():
    one_pass = [s for index in range(6) for s in build_samples(index, seed=3, size=SIZE)]
    # Chunks built out of order, as parallel workers would finish them.
    late = [s for index in range(3, 6) for s in build_samples(index, seed=3, size=SIZE)]
    early = [s for index in range(0, 3) for s in build_samples(index, seed=3, size=SIZE)]
    _same_samples(one_pass, early + late)


def test_task_subset_gives_the_same_samples():
    everything = build_samples(5, seed=1, size=SIZE)
    only_style = build_samples(5, seed=1, size=SIZE, tasks=("style-driven", "extending"))
    _same_samples([everything[TASKS.index("style-driven")], everything[0]], only_style)


def test_unknown_task_suggests_the_nearest_name():
    with pytest.raises(ValueError, match="did you mean 'filling'"):
        build_samples(0, seed=0, size=SIZE, tasks=("filing",))


def test_generate_dataset_rows_load_back_in_index_order(tmp_path):
    manifest = generate_dataset(tmp_path, n=2, seed=0, start=4, split="val", progress=False)
    load = load_manifest(manifest, require_target=True)
    assert load.skipped == 0
    assert [row.id for row in load.rows] == [f"val-{i:06d}-{task}" for i in (4, 5) for task in TASKS]
    assert task_counts(load.rows) == {task: 2 for task in TASKS}


EXPECTED_META = {
    "extending": {"crop_box"},
    "filling": {"mask_box"},
    "rescaling": {"target_aspect", "element_boxes"},
    "identity-driven": {"entity_box", "entity"},
    "layout-driven": {"layout_boxes"},
    "style-driven": {"style", "entity_box"},
}
INPUT_COUNTS = {"extending": {1}, "filling": {1}, "rescaling": {1}, "identity-driven": {1},
                "layout-driven": {2, 3}, "style-driven": {2}}


def _boxes_of(meta: dict) -> list[list[float]]:
    boxes = [meta[key] for key in ("crop_box", "mask_box", "entity_box") if key in meta]
    for key in ("element_boxes", "layout_boxes"):
        boxes += [element["box"] for element in meta.get(key, [])]
    return boxes


@pytest.mark.parametrize("task", TASKS)
def test_sample_structure(task, samples_by_task):
    for sample in samples_by_task[task]:
        assert sample.task == task and sample.id.endswith(task) and REGIME[task] in ("local", "global")
        assert len(sample.inputs) in INPUT_COUNTS[task]
        assert EXPECTED_META[task] | {"poster"} <= set(sample.meta)
        json.dumps(sample.meta)  # JSON-serializable as the manifest needs
        assert {"title", "subtitle", "family", "aspect"} <= set(sample.meta["poster"])
        assert sample.meta["poster"]["family"] in STYLE_FAMILIES
        assert all(image.mode == "RGB" for image in sample.inputs + [sample.target])
        poster_size = canvas_size(tuple(sample.meta["poster"]["aspect"]), SIZE)
        assert all(image.size == poster_size for image in sample.inputs)
        width, height = sample.target.size
        for x0, y0, x1, y1 in _boxes_of(sample.meta):
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert (x1 - x0) * width >= 3 and (y1 - y0) * height >= 3, "degenerate box at 64 px"
        if task == "rescaling":
            aspect_w, aspect_h = sample.meta["target_aspect"]
            assert (aspect_w, aspect_h) != tuple(sample.meta["poster"]["aspect"])
            assert sample.target.size == canvas_size((aspect_w, aspect_h), SIZE)
            assert max(sample.target.size) == SIZE
            assert abs((width / height) / (aspect_w / aspect_h) - 1) < 0.12  # short side rounds to 8 px
        else:
            assert sample.target.size == poster_size
        if task in ("identity-driven", "layout-driven", "style-driven"):
            assert sample.meta["poster"]["title"] in sample.instruction


def _box_pixels(box, size):
    width, height = size
    return round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)


def test_extending_shows_only_the_crop(samples_by_task):
    for sample in samples_by_task["extending"]:
        x0, y0, x1, y1 = _box_pixels(sample.meta["crop_box"], sample.target.size)
        width, height = sample.target.size
        assert 0.38 <= (x1 - x0) / width <= 0.77 and 0.38 <= (y1 - y0) / height <= 0.77
        frame, target = _pixels(sample.inputs[0]), _pixels(sample.target)
        assert np.array_equal(frame[y0:y1, x0:x1], target[y0:y1, x0:x1])
        outside = np.ones(frame.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert (frame[outside] == NEUTRAL_GRAY).all()


def test_filling_hides_part_of_an_element(samples_by_task):
    for sample in samples_by_task["filling"]:
        x0, y0, x1, y1 = _box_pixels(sample.meta["mask_box"], sample.target.size)
        width, height = sample.target.size
        assert 0.18 <= (x1 - x0) / width <= 0.47 and 0.18 <= (y1 - y0) / height <= 0.47
        masked, target = _pixels(sample.inputs[0]), _pixels(sample.target)
        assert (masked[y0:y1, x0:x1] == NEUTRAL_GRAY).all()
        keep = np.ones(masked.shape[:2], bool)
        keep[y0:y1, x0:x1] = False
        assert np.array_equal(masked[keep], target[keep])
        element = next(e["box"] for e in sample.meta["element_boxes"] if e["name"] == sample.meta["masked_element"])
        mask = sample.meta["mask_box"]
        overlap = (max(0, min(mask[2], element[2]) - max(mask[0], element[0]))
                   * max(0, min(mask[3], element[3]) - max(mask[1], element[1])))
        smaller = min((mask[2] - mask[0]) * (mask[3] - mask[1]), (element[2] - element[0]) * (element[3] - element[1]))
        assert overlap >= 0.25 * smaller


def test_style_reference_shares_the_style_but_not_the_content(samples_by_task):
    for sample in samples_by_task["style-driven"]:
        reference, content = sample.inputs
        assert not np.array_equal(_pixels(reference), _pixels(sample.target))
        assert sample.meta["style"]["family"] == sample.meta["poster"]["family"]
        # The entity image is the target's entity: its colour appears in the target's entity box.
        color = np.array(sample.meta["entity"]["color"])
        x0, y0, x1, y1 = _box_pixels(sample.meta["entity_box"], sample.target.size)
        region = _pixels(sample.target)[y0:y1, x0:x1].reshape(-1, 3).astype(int)
        assert (np.abs(region - color).sum(axis=1) < 30).mean() > 0.1


def test_layout_sketch_outlines_each_box(samples_by_task):
    for sample in samples_by_task["layout-driven"]:
        sketch = _pixels(sample.inputs[0])
        assert len(sample.inputs) == 1 + min(2, len(sample.meta["layout_boxes"]) - 2)
        for element in sample.meta["layout_boxes"]:
            x0, y0, x1, y1 = _box_pixels(element["box"], sample.target.size)
            assert (sketch[y0, x0:x1] != 255).any(), element["name"]


@pytest.mark.parametrize("size", [64, 256])
def test_posters_render_at_every_aspect(size):
    spec = sample_spec(np.random.default_rng([0, 11, 0]))
    for aspect in [(3, 4), (1, 1), (4, 3), (16, 9), (9, 16)]:
        width, height = canvas_size(aspect, size)
        image = render(spec, width, height)
        assert image.size == (width, height) and max(image.size) == size
        assert np.asarray(image).std() > 10  # something is drawn


def test_contact_sheet_has_one_row_per_task(tmp_path):
    manifest = generate_dataset(tmp_path / "data", n=2, seed=0, progress=False)
    rows = load_manifest(manifest).rows
    cell = 48
    sheet = Image.open(contact_sheet(rows, tmp_path / "sheet.png", per_task=2, cell=cell))
    assert sheet.height == len(TASKS) * (cell + 2 * PADDING)
    two_tasks = [row for row in rows if row.task in ("filling", "style-driven")]
    sheet = Image.open(contact_sheet(two_tasks, tmp_path / "two.png", per_task=1, cell=cell))
    assert sheet.height == 2 * (cell + 2 * PADDING)
