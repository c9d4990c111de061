"""The six poster tasks built from one procedural poster, and dataset generation.

Every sample of poster `i` is a pure function of (seed, i) — and of the task, through its own
random stream — so chunks generated in parallel equal one sequential pass, and asking for a subset
of tasks gives the same samples as asking for all of them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from posterrl.data.posters import (
    LAYOUT_TEMPLATES,
    NEUTRAL_GRAY,
    Box,
    ElementBox,
    PosterSpec,
    canvas_size,
    element_boxes,
    restyle_reference,
    sample_spec,
)
from posterrl.data.render import render, render_entity, render_layout_sketch
from posterrl.errors import UserError
from posterrl.names import TASKS  # the task names, defined once (the config's data.tasks too)

REGIME = {"extending": "local", "filling": "local", "rescaling": "local",
          "identity-driven": "local", "layout-driven": "global", "style-driven": "global"}
RESCALE_ASPECTS = ((1, 1), (4, 3), (16, 9), (9, 16), (3, 4))
MAX_LAYOUT_ENTITY_INPUTS = 2


@dataclass
class TaskSample:
    id: str
    task: str
    instruction: str
    inputs: list[Image.Image]
    target: Image.Image | None
    meta: dict = field(default_factory=dict)


INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "extending": (
        "Extend this cropped poster to its full size.",
        "Outpaint the gray area around this crop to complete the {family} poster titled \"{title}\".",
        "Complete the poster around the visible part; its title reads \"{title}\".",
    ),
    "filling": (
        "Fill in the gray masked region of this poster.",
        "Restore the hidden part of this {family} poster titled \"{title}\".",
        "Paint the missing region so the poster \"{title}\" is whole again.",
    ),
    "rescaling": (
        "Re-layout this poster for a {target_w}:{target_h} format.",
        "Resize this {family} poster to {target_w}:{target_h}, rearranging the title and artwork to fit.",
        "Adapt the poster \"{title}\" to a {target_w}:{target_h} canvas without losing any element.",
    ),
    "identity-driven": (
        "Create a {family} poster titled \"{title}\" featuring this object, {layout_phrase}; "
        "subtitle: \"{subtitle}\".",
        "Design a {family} poster around this exact {entity}, {layout_phrase}, with the title \"{title}\" "
        "and the subtitle \"{subtitle}\".",
        "Make a {family} poster titled \"{title}\" ({subtitle}) that keeps this object unchanged, {layout_phrase}.",
    ),
    "layout-driven": (
        "Design a {family} poster titled \"{title}\" that follows this layout sketch, using the given objects; "
        "subtitle: \"{subtitle}\".",
        "Fill this layout with a {family} poster: title \"{title}\" in the red box, \"{subtitle}\" in the "
        "blue box, the objects in the green boxes.",
        "Create a {family} poster from the sketch and the objects shown, titled \"{title}\", "
        "subtitle \"{subtitle}\".",
    ),
    "style-driven": (
        "Make a poster titled \"{title}\" featuring this object in the style of the reference poster, "
        "{layout_phrase}; subtitle: \"{subtitle}\".",
        "Use the look of the first poster to design a poster titled \"{title}\" around this {entity}, "
        "{layout_phrase}, with the subtitle \"{subtitle}\".",
        "Restyle this object into a poster like the reference: title \"{title}\", subtitle \"{subtitle}\", "
        "{layout_phrase}.",
    ),
}
LAYOUT_PHRASES = {
    "title-top": "with the title at the top",
    "title-bottom": "with the title below the artwork",
    "banner": "with the title on a colour band",
}


# A split names files (`images/<split>-NNNNNN-<task>_input0.png`) and row ids: a plain name, never a path.
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_split(split: str, key: str = "split") -> str:
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise UserError(f"{key} {split!r}: expected a plain name of letters, digits, '_' and '-' (it becomes part "
                        "of file names and row ids), e.g. train")
    return split


def check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    for task in tasks:
        if task not in TASKS:
            close = difflib.get_close_matches(task, TASKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown task {task!r}{hint}; known tasks: {', '.join(TASKS)}")
    return tasks


def _snap_box(box: Box, width: int, height: int) -> Box:
    """Round a relative box to whole pixels so meta and pixels describe exactly the same region."""
    x0, y0 = round(box[0] * width), round(box[1] * height)
    x1, y1 = max(x0 + 1, round(box[2] * width)), max(y0 + 1, round(box[3] * height))
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def _pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    return (round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height))


def _rounded(box: Box) -> list[float]:
    return [round(v, 5) for v in box]


class _Context:
    """What the task builders of one poster share: the spec, its size and a render cache."""

    def __init__(self, spec: PosterSpec, size: int):
        self.spec = spec
        self.size = size
        self.width, self.height = canvas_size(spec.aspect, size)
        self._cache: dict[tuple[PosterSpec, int, int], Image.Image] = {}

    def render(self, spec: PosterSpec, width: int | None = None, height: int | None = None) -> Image.Image:
        key = (spec, width or self.width, height or self.height)
        if key not in self._cache:
            self._cache[key] = render(spec, key[1], key[2])
        return self._cache[key]

    def boxes(self, spec: PosterSpec, width: int | None = None, height: int | None = None) -> list[ElementBox]:
        w, h = width or self.width, height or self.height
        return [ElementBox(b.name, _snap_box(b.box, w, h)) for b in element_boxes(spec, w / h)]

    def instruction(self, rng: np.random.Generator, task: str, spec: PosterSpec, **extra: str) -> str:
        template = INSTRUCTIONS[task][int(rng.integers(len(INSTRUCTIONS[task])))]
        return template.format(title=spec.title, subtitle=spec.subtitle, family=spec.family,
                               layout_phrase=LAYOUT_PHRASES[spec.layout], **extra)

    def meta(self, spec: PosterSpec, **fields: object) -> dict:
        return {"poster": spec.summary(), **fields}


def _extending(ctx: _Context, rng: np.random.Generator) -> tuple[str, list[Image.Image], Image.Image, dict]:
    target = ctx.render(ctx.spec)
    cw, ch = rng.uniform(0.4, 0.75, size=2)
    x0, y0 = rng.uniform(0, 1 - cw), rng.uniform(0, 1 - ch)
    crop_box = _snap_box((x0, y0, x0 + cw, y0 + ch), ctx.width, ctx.height)
    frame = Image.new("RGB", target.size, NEUTRAL_GRAY)
    pixels = _pixels(crop_box, ctx.width, ctx.height)
    frame.paste(target.crop(pixels), pixels[:2])
    return ctx.instruction(rng, "extending", ctx.spec), [frame], target, ctx.meta(ctx.spec, crop_box=_rounded(crop_box))


def _filling(ctx: _Context, rng: np.random.Generator) -> tuple[str, list[Image.Image], Image.Image, dict]:
    target = ctx.render(ctx.spec)
    elements = ctx.boxes(ctx.spec)
    element = elements[int(rng.integers(len(elements)))]
    mw, mh = rng.uniform(0.2, 0.45, size=2)
    # Centre the mask near the element's centre so it always hides a good part of that element.
    ex0, ey0, ex1, ey1 = element.box
    cx = (ex0 + ex1) / 2 + rng.uniform(-0.25, 0.25) * min(mw, ex1 - ex0)
    cy = (ey0 + ey1) / 2 + rng.uniform(-0.25, 0.25) * min(mh, ey1 - ey0)
    x0 = float(np.clip(cx - mw / 2, 0, 1 - mw))
    y0 = float(np.clip(cy - mh / 2, 0, 1 - mh))
    mask_box = _snap_box((x0, y0, x0 + mw, y0 + mh), ctx.width, ctx.height)
    masked = target.copy()
    masked.paste(NEUTRAL_GRAY, _pixels(mask_box, ctx.width, ctx.height))
    meta = ctx.meta(ctx.spec, mask_box=_rounded(mask_box), masked_element=element.name,
                    element_boxes=[b.to_json() for b in elements])
    return ctx.instruction(rng, "filling", ctx.spec), [masked], target, meta


def _rescaling(ctx: _Context, rng: np.random.Generator) -> tuple[str, list[Image.Image], Image.Image, dict]:
    choices = [a for a in RESCALE_ASPECTS if a != ctx.spec.aspect]
    target_aspect = choices[int(rng.integers(len(choices)))]
    tw, th = canvas_size(target_aspect, ctx.size)
    target = ctx.render(ctx.spec, tw, th)
    meta = ctx.meta(ctx.spec, target_aspect=list(target_aspect),
                    element_boxes=[b.to_json() for b in ctx.boxes(ctx.spec, tw, th)])
    instruction = ctx.instruction(rng, "rescaling", ctx.spec, target_w=str(target_aspect[0]),
                                  target_h=str(target_aspect[1]))
    return instruction, [ctx.render(ctx.spec)], target, meta


def _entity_box(ctx: _Context, spec: PosterSpec) -> list[float]:
    return _rounded(next(b.box for b in ctx.boxes(spec) if b.name == "entity_0"))


def _identity(ctx: _Context, rng: np.random.Generator) -> tuple[str, list[Image.Image], Image.Image, dict]:
    # One entity only, so "a poster with exactly this entity" is what the target shows.
    entity = ctx.spec.entities[0]
    spec = replace(ctx.spec, entities=(entity,))
    meta = ctx.meta(spec, entity_box=_entity_box(ctx, spec), entity=entity.to_json())
    instruction = ctx.instruction(rng, "identity-driven", spec, entity=entity.describe())
    return instruction, [render_entity(entity, ctx.width, ctx.height)], ctx.render(spec), meta


def _layout(ctx: _Context, rng: np.random.Generator) -> tuple[str, list[Image.Image], Image.Image, dict]:
    # At most two entity images travel with the sketch (the policy takes up to three inputs).
    spec = replace(ctx.spec, entities=ctx.spec.entities[:MAX_LAYOUT_ENTITY_INPUTS])
    boxes = ctx.boxes(spec)
    sketch = render_layout_sketch(boxes, ctx.width, ctx.height)
    inputs = [sketch] + [render_entity(e, ctx.width, ctx.height) for e in spec.entities]
    meta = ctx.meta(spec, layout_boxes=[b.to_json() for b in boxes],
                    entities=[e.to_json() for e in spec.entities])
    return ctx.instruction(rng, "layout-driven", spec), inputs, ctx.render(spec), meta


def _style(ctx: _Context, rng: np.random.Generator) -> tuple[str, list[Image.Image], Image.Image, dict]:
    # The content is the poster's last entity (another one than identity-driven's when there are
    # several) and the layout is drawn afresh, so this task's targets differ from identity-driven's.
    entity = ctx.spec.entities[-1]
    layout = LAYOUT_TEMPLATES[int(rng.integers(len(LAYOUT_TEMPLATES)))]
    spec = replace(ctx.spec, entities=(entity,), layout=layout)
    reference = restyle_reference(rng, spec)
    style = {
        "family": spec.family,
        "palette": spec.palette.to_json(),
        "background": spec.background,
        "texture": entity.texture,
    }
    meta = ctx.meta(spec, style=style, entity_box=_entity_box(ctx, spec), entity=entity.to_json())
    inputs = [ctx.render(reference), render_entity(entity, ctx.width, ctx.height)]
    instruction = ctx.instruction(rng, "style-driven", spec, entity=entity.describe())
    return instruction, inputs, ctx.render(spec), meta


Builder = Callable[[_Context, np.random.Generator], tuple[str, list[Image.Image], Image.Image, dict]]
BUILDERS: dict[str, Builder] = {
    "extending": _extending,
    "filling": _filling,
    "rescaling": _rescaling,
    "identity-driven": _identity,
    "layout-driven": _layout,
    "style-driven": _style,
}


def build_samples(poster_index: int, seed: int, size: int, tasks: Iterable[str] = TASKS,
                  split: str = "train") -> list[TaskSample]:
    """One sample per requested task from poster `poster_index`.

    Pixels depend on (seed, poster_index, task) only; `split` only names the ids, so a validation
    set needs its own seed or index range to be disjoint from the training set.
    """
    tasks = check_tasks(tasks)
    spec = sample_spec(np.random.default_rng([seed, poster_index, 0]))
    ctx = _Context(spec, size)
    samples = []
    for task in tasks:
        rng = np.random.default_rng([seed, poster_index, 1 + TASKS.index(task)])
        instruction, inputs, target, meta = BUILDERS[task](ctx, rng)
        samples.append(TaskSample(id=f"{split}-{poster_index:06d}-{task}", task=task, instruction=instruction,
                                  inputs=inputs, target=target, meta=meta))
    return samples


def write_samples(samples: Iterable[TaskSample], out_dir: str | Path) -> list[dict]:
    """Save each sample's images as PNGs under out_dir/images/ and return its manifest rows."""
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in samples:
        inputs = []
        for k, image in enumerate(sample.inputs):
            name = f"images/{sample.id}_input{k}.png"
            image.save(out_dir / name)
            inputs.append(name)
        target = None
        if sample.target is not None:
            target = f"images/{sample.id}_target.png"
            sample.target.save(out_dir / target)
        rows.append({"id": sample.id, "task": sample.task, "instruction": sample.instruction,
                     "inputs": inputs, "target": target, "meta": sample.meta})
    return rows


def generate_dataset(out_dir: str | Path, n: int, seed: int = 0, size: int = 64, split: str = "train",
                     start: int = 0, tasks: Iterable[str] = TASKS, progress: bool = True) -> Path:
    """Posters start..start+n-1, one sample of every task each; writes out_dir/manifest.jsonl
    (rows in index order) and returns its path."""
    tasks, split = check_tasks(tasks), check_split(split)
    out_dir = Path(out_dir)
    rows: list[dict] = []
    for index in tqdm(range(start, start + n), desc=f"posters ({split})", unit="poster", disable=not progress):
        rows += write_samples(build_samples(index, seed, size, tasks, split), out_dir)
    # Imported here because manifest.py validates rows against TASKS from this module.
    from posterrl.data.manifest import write_manifest

    manifest = out_dir / "manifest.jsonl"
    write_manifest(rows, manifest)
    return manifest
