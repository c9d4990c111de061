"""Drawing procedural posters (posterrl/data/posters.py has the specs and layouts) with PIL."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from posterrl.data.posters import (
    PLAIN_DARK,
    PLAIN_LIGHT,
    RGB,
    SHAPES,
    TEXTURES,
    Box,
    ElementBox,
    Entity,
    PosterSpec,
    banner_band,
    color_distance,
    element_boxes,
    mix_rgb,
    readable_on,
)


def _supersample(long_side: int) -> int:
    # Draw large and box-downsample: smooth edges and legible text at 64 px, bounded cost at 512 px.
    return 4 if long_side <= 128 else 2 if long_side <= 640 else 1


@lru_cache(maxsize=512)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType: a fixed-size bitmap font
        raise RuntimeError("rendering posters needs Pillow with FreeType support (sized fonts)")
    return font


def _background(spec: PosterSpec, width: int, height: int) -> np.ndarray:
    c0, c1 = (np.array(c, dtype=np.float32) for c in spec.palette.background)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (xs + 0.5) / width, (ys + 0.5) / height
    short = float(min(width, height))
    kind = spec.background
    if kind == "solid":
        t = np.zeros_like(u)
    elif kind == "vertical-gradient":
        t = v
    elif kind == "diagonal-gradient":
        t = (xs + ys) / (width + height)
    elif kind == "radial-gradient":
        t = np.clip(np.hypot(xs - 0.5 * width, ys - 0.4 * height) / (0.8 * max(width, height)), 0, 1)
    elif kind == "stripes":
        period = 0.2 * short
        t = (((xs + ys) / period) % 1.0 < 0.5).astype(np.float32)
    elif kind == "dots":
        period = 0.12 * short
        dx = (xs / period) % 1.0 - 0.5
        dy = (ys / period) % 1.0 - 0.5
        t = (np.hypot(dx, dy) < 0.22).astype(np.float32)
    elif kind == "split":
        t = (v > 0.3 + 0.35 * u).astype(np.float32)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _shape_mask(shape: str, box: tuple[float, float, float, float], size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2

    def polygon(points: list[tuple[float, float]]) -> None:
        draw.polygon([(cx + px * r, cy + py * r) for px, py in points], fill=255)

    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = 0.55 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        s = 0.86 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape == "triangle":
        polygon([(0, -1), (0.98, 0.8), (-0.98, 0.8)])
    elif shape == "diamond":
        polygon([(0, -1), (0.8, 0), (0, 1), (-0.8, 0)])
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        polygon([(float(rr * np.cos(a)), float(rr * np.sin(a) + 0.08)) for rr, a in zip(radii, angles, strict=True)])
    elif shape == "cross":
        arm = 0.32
        polygon([(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1), (-arm, 1),
                 (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)])
    elif shape == "hexagon":
        angles = np.arange(6) * np.pi / 3
        polygon([(float(np.cos(a)), float(np.sin(a))) for a in angles])
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask


def _texture_fill(entity: Entity, box: tuple[float, float, float, float],
                  region: tuple[int, int, int, int]) -> Image.Image:
    """The entity's fill over `region` (pixel bounds around the box); the pattern is anchored to the
    box and scales with it, so it looks the same at any render size and position."""
    rx0, ry0, rx1, ry1 = region
    size = (rx1 - rx0, ry1 - ry0)
    if entity.texture == "solid":
        return Image.new("RGB", size, entity.color)
    color = np.array(entity.color, dtype=np.float32)
    second = np.array(entity.texture_color, dtype=np.float32)
    x0, y0, x1, _ = box
    period = max((x1 - x0) / 4.0, 2.0)
    ys, xs = np.mgrid[ry0:ry1, rx0:rx1].astype(np.float32)
    u, v = (xs - x0) / period, (ys - y0) / period
    if entity.texture == "stripes":
        t = ((u + v) % 1.0 < 0.45)
    elif entity.texture == "dots":
        t = np.hypot(u % 1.0 - 0.5, v % 1.0 - 0.5) < 0.28
    elif entity.texture == "checker":
        t = (np.floor(u) + np.floor(v)) % 2 == 0
    else:
        raise ValueError(f"unknown texture {entity.texture!r}; known: {', '.join(TEXTURES)}")
    t = t.astype(np.float32)[..., None]
    return Image.fromarray((color * (1 - t) + second * t).round().astype(np.uint8), "RGB")


def _draw_entity(canvas: Image.Image, entity: Entity, box: tuple[float, float, float, float],
                 shadow_color: RGB | None) -> None:
    size = canvas.size
    mask = _shape_mask(entity.shape, box, size)
    if shadow_color is not None:
        offset = round(0.05 * (box[2] - box[0]))
        shadow = Image.new("L", size, 0)
        shadow.paste(mask, (offset, offset))
        canvas.paste(Image.new("RGB", size, shadow_color), (0, 0), shadow.point(lambda p: p * 55 // 100))
    # Texture only the entity's pixel bounds: full-canvas patterns dominate the cost at 512 px.
    region = (max(0, int(box[0]) - 1), max(0, int(box[1]) - 1),
              min(size[0], int(np.ceil(box[2])) + 1), min(size[1], int(np.ceil(box[3])) + 1))
    canvas.paste(_texture_fill(entity, box, region), region[:2], mask.crop(region))


def _line_splits(text: str) -> list[list[str]]:
    """One line, or two lines broken at the ' - ' separator when there is one, else at any space."""
    if " - " in text:
        return [[text], text.split(" - ", 1)]
    words = text.split()
    return [[text]] + [[" ".join(words[:k]), " ".join(words[k:])] for k in range(1, len(words))]


def _fit_text(text: str, box_px: tuple[float, float, float, float],
              stroke: float) -> tuple[list[str], int, int]:
    """Largest font size (and line split) for which the text block fits the box."""
    bw, bh = box_px[2] - box_px[0], box_px[3] - box_px[1]
    splits = _line_splits(text)
    best: tuple[list[str], int, int] = ([text], 1, 0)
    reference = 100
    for lines in splits:
        widest = max(_font(reference).getbbox(line)[2] for line in lines) / reference
        line_gap = 0.25
        size = int(min(bw / (widest * (1 + stroke)), bh / (len(lines) + line_gap * (len(lines) - 1)) / 0.8))
        size = max(size, 1)
        stroke_px = int(round(stroke * size))
        while size > 1 and max(_font(size).getbbox(line, stroke_width=stroke_px)[2] for line in lines) > bw:
            size -= 1
            stroke_px = int(round(stroke * size))
        if size > best[1]:
            best = (lines, size, stroke_px)
    return best


def _draw_text(draw: ImageDraw.ImageDraw, text: str, box_px: tuple[float, float, float, float], color: RGB,
               align: str, stroke: float) -> None:
    lines, size, stroke_px = _fit_text(text, box_px, stroke)
    font = _font(size)
    bboxes = [font.getbbox(line, stroke_width=stroke_px) for line in lines]
    # Cap height of the font sets the line pitch, so every line has the same height.
    cap_top, cap_bottom = font.getbbox("H", stroke_width=stroke_px)[1::2]
    line_h = cap_bottom - cap_top
    gap = 0.25 * size
    block_h = len(lines) * line_h + (len(lines) - 1) * gap
    y = box_px[1] + (box_px[3] - box_px[1] - block_h) / 2
    for line, bbox in zip(lines, bboxes, strict=True):
        line_w = bbox[2] - bbox[0]
        x = box_px[0] if align == "left" else box_px[0] + (box_px[2] - box_px[0] - line_w) / 2
        draw.text((x - bbox[0], y - cap_top), line, font=font, fill=color, stroke_width=stroke_px, stroke_fill=color)
        y += line_h + gap


def render(spec: PosterSpec, width: int, height: int) -> Image.Image:
    """Draw the poster at width x height (layout follows the canvas aspect)."""
    ss = _supersample(max(width, height))
    big_w, big_h = width * ss, height * ss
    canvas = Image.fromarray(_background(spec, big_w, big_h).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    boxes = element_boxes(spec, width / height)

    def px(box: Box) -> tuple[float, float, float, float]:
        return (box[0] * big_w, box[1] * big_h, box[2] * big_w, box[3] * big_h)

    title_box = next(b.box for b in boxes if b.name == "title")
    subtitle_box = next(b.box for b in boxes if b.name == "subtitle")
    title_color = spec.palette.text
    if spec.layout == "banner":
        band_color = spec.palette.accents[-1]
        draw.rectangle(px(banner_band(title_box)), fill=band_color)
        title_color = readable_on(band_color, spec.palette.text)
    shadow_color = mix_rgb(spec.palette.background[0], (0, 0, 0), 0.55) if spec.shadow else None
    for entity, box in zip(spec.entities, (b for b in boxes if b.kind == "entity"), strict=True):
        _draw_entity(canvas, entity, px(box.box), shadow_color)
    bold = 0.06 if spec.family in ("retro", "bold-geometric") else 0.03
    # Inset the text a little so glyphs never touch the box edge.
    inset = 0.04 * min(big_w, big_h)

    def inner(box: Box) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = px(box)
        return (x0 + inset, y0 + inset * 0.5, x1 - inset, y1 - inset * 0.5)

    _draw_text(draw, spec.title, inner(title_box), title_color, spec.align, stroke=bold)
    subtitle_color = readable_on(mix_rgb(*spec.palette.background, 0.5), spec.palette.text)
    _draw_text(draw, spec.subtitle, inner(subtitle_box), subtitle_color, spec.align, stroke=0.0)
    return canvas.reduce(ss) if ss > 1 else canvas


def entity_backdrop(entity: Entity) -> RGB:
    """A plain light backdrop, or a dark one when the entity itself is too light to show on it."""
    return PLAIN_LIGHT if color_distance(entity.color, PLAIN_LIGHT) > 0.2 else PLAIN_DARK


def render_entity(entity: Entity, width: int, height: int, scale: float = 0.72) -> Image.Image:
    """The entity alone, centred on a plain backdrop: the 'entity image' input of several tasks."""
    ss = _supersample(max(width, height))
    big_w, big_h = width * ss, height * ss
    canvas = Image.new("RGB", (big_w, big_h), entity_backdrop(entity))
    side = scale * min(big_w, big_h)
    box = ((big_w - side) / 2, (big_h - side) / 2, (big_w + side) / 2, (big_h + side) / 2)
    _draw_entity(canvas, entity, box, shadow_color=None)
    return canvas.reduce(ss) if ss > 1 else canvas


SKETCH_COLORS: dict[str, RGB] = {"title": (220, 40, 40), "subtitle": (40, 90, 220), "entity": (20, 150, 60)}


def render_layout_sketch(boxes: list[ElementBox], width: int, height: int) -> Image.Image:
    """White canvas with each element box as an outline, coloured by kind (title / subtitle / entity)."""
    ss = _supersample(max(width, height))
    big_w, big_h = width * ss, height * ss
    canvas = Image.new("RGB", (big_w, big_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    line = max(ss, round(max(big_w, big_h) / 96))
    for element in boxes:
        x0, y0, x1, y1 = element.box
        draw.rectangle((x0 * big_w, y0 * big_h, x1 * big_w - 1, y1 * big_h - 1),
                       outline=SKETCH_COLORS[element.kind], width=line)
    return canvas.reduce(ss) if ss > 1 else canvas
