"""Procedural posters: a `PosterSpec` sampled from a style family, laid out for any aspect, drawn with PIL.

Everything is deterministic given a numpy Generator, and layout boxes are computed in relative
coordinates from the template *and* the aspect, so one spec re-renders sensibly at another aspect
(portrait stacks text and artwork, landscape puts them side by side).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace

import numpy as np

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]  # relative [x0, y0, x1, y1] in [0, 1]

STYLE_FAMILIES = ("minimalist", "retro", "gradient", "bold-geometric", "pastel", "dark")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "ring", "cross", "hexagon")
TEXTURES = ("solid", "stripes", "dots", "checker")
BACKGROUND_KINDS = (
    "solid", "vertical-gradient", "diagonal-gradient", "radial-gradient", "stripes", "dots", "split",
)
LAYOUT_TEMPLATES = ("title-top", "title-bottom", "banner")
BASE_ASPECT = (3, 4)
NEUTRAL_GRAY: RGB = (128, 128, 128)
PLAIN_LIGHT: RGB = (238, 238, 234)
PLAIN_DARK: RGB = (44, 44, 48)

TITLE_FIRST = (
    "SUMMER", "NEON", "URBAN", "GOLDEN", "SPRING", "MIDNIGHT", "COSMIC", "WILD", "OPEN", "FRESH",
    "LUNAR", "ELECTRIC", "SILENT", "GRAND", "WINTER", "OCEAN", "VELVET", "RETRO", "SUNDAY", "CITY",
)
TITLE_MIDDLE = (
    "JAZZ", "ART", "FILM", "BOOK", "COFFEE", "DESIGN", "FOOD", "DANCE", "NIGHT", "STREET", "GARDEN",
    "CYCLE", "VINYL", "CRAFT",
)
TITLE_LAST = (
    "FESTIVAL", "MARKET", "NIGHTS", "SALE", "EXPO", "RUN", "CINEMA", "FAIR", "CLUB", "WEEK", "TOUR",
    "LAB", "PARTY", "SHOW",
)
WEEKDAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUNE", "JULY", "AUG", "SEPT", "OCT", "NOV", "DEC")
VENUES = (
    "City Hall", "Old Harbour", "Main Square", "The Warehouse", "Riverside Park", "Gallery 9",
    "North Pier", "Union Hall", "Botanic Garden", "Studio 4",
)


@dataclass(frozen=True)
class Palette:
    background: tuple[RGB, RGB]  # the second colour feeds gradients and patterns
    accents: tuple[RGB, ...]
    text: RGB

    def to_json(self) -> dict:
        return {
            "background": [list(c) for c in self.background],
            "accents": [list(c) for c in self.accents],
            "text": list(self.text),
        }


@dataclass(frozen=True)
class Entity:
    shape: str
    color: RGB
    texture: str
    texture_color: RGB

    def describe(self) -> str:
        texture_word = {"solid": "solid", "stripes": "striped", "dots": "dotted", "checker": "checkered"}
        return f"{color_name(self.color)} {texture_word[self.texture]} {self.shape}"

    def to_json(self) -> dict:
        return {
            "shape": self.shape,
            "color": list(self.color),
            "texture": self.texture,
            "texture_color": list(self.texture_color),
            "description": self.describe(),
        }


@dataclass(frozen=True)
class PosterSpec:
    family: str
    palette: Palette
    background: str
    entities: tuple[Entity, ...]
    title: str
    subtitle: str
    layout: str
    align: str  # "center" or "left" for the text block
    shadow: bool  # drop shadows under entities (retro / bold looks)
    aspect: tuple[int, int] = BASE_ASPECT

    def summary(self) -> dict:
        """What every sample's meta carries as `poster` (later OCR rewards read the title here)."""
        return {
            "title": self.title,
            "subtitle": self.subtitle,
            "family": self.family,
            "aspect": list(self.aspect),
            "layout": self.layout,
            "background": self.background,
        }


@dataclass(frozen=True)
class ElementBox:
    name: str  # "title", "subtitle", "entity_0", "entity_1", ...
    box: Box

    @property
    def kind(self) -> str:
        return self.name.split("_")[0]

    def to_json(self) -> dict:
        return {"name": self.name, "box": [round(v, 5) for v in self.box]}


# ----------------------------------------------------------------------------------------- colours

def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _luminance(c: RGB) -> float:
    lin = [(x / 255) / 12.92 if x <= 10 else ((x / 255 + 0.055) / 1.055) ** 2.4 for x in c]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast_ratio(a: RGB, b: RGB) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def color_distance(a: RGB, b: RGB) -> float:
    """RMS distance on [0, 1] RGB."""
    return float(np.sqrt(np.mean(((np.array(a) - np.array(b)) / 255.0) ** 2)))


def mix_rgb(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def readable_on(background: RGB, preferred: RGB) -> RGB:
    """Keep the preferred text colour when it reads on the background, else black or white."""
    if contrast_ratio(preferred, background) >= 3.0:
        return preferred
    black, white = (20, 20, 24), (250, 250, 250)
    return black if contrast_ratio(black, background) >= contrast_ratio(white, background) else white


def color_name(c: RGB) -> str:
    h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in c))
    if v < 0.2:
        return "black"
    if s < 0.15:
        return "white" if v > 0.85 else "gray"
    names = (
        (0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.27, "lime"), (0.44, "green"),
        (0.53, "teal"), (0.58, "cyan"), (0.72, "blue"), (0.81, "purple"), (0.93, "magenta"), (1.01, "red"),
    )
    name = next(n for limit, n in names if h < limit)
    if s < 0.45 and v > 0.8:
        return f"light {name}"
    if v < 0.5:
        return f"dark {name}"
    return name


# ------------------------------------------------------------------------------------ style families

def _pick(rng: np.random.Generator, options: dict[str, float]) -> str:
    names = list(options)
    weights = np.array([options[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _far_from_gray(c: RGB) -> bool:
    # Masked and cropped regions are neutral gray: a gray background would make them invisible.
    return color_distance(c, NEUTRAL_GRAY) > 0.2


def _family_palette(rng: np.random.Generator, family: str) -> Palette:
    u = rng.uniform
    if family == "minimalist":
        hue = u()
        bg0 = _hsv(hue, u(0.0, 0.08), u(0.93, 0.98))
        bg1 = mix_rgb(bg0, (0, 0, 0), 0.08)
        accents: tuple[RGB, ...] = (_hsv(hue + u(0.3, 0.7), u(0.65, 0.9), u(0.6, 0.9)), (30, 30, 34),
                                    _hsv(hue + u(0.3, 0.7) + 0.08, u(0.5, 0.8), u(0.55, 0.85)))
        text = (24, 24, 28)
    elif family == "retro":
        hues = rng.permutation([0.03, 0.08, 0.13, 0.5, 0.2, 0.55])
        bg0 = _hsv(0.11, u(0.12, 0.25), u(0.9, 0.96)) if u() < 0.6 else _hsv(0.12, u(0.55, 0.7), u(0.85, 0.92))
        bg1 = mix_rgb(bg0, _hsv(hues[3], 0.6, 0.75), 0.35)
        accents = tuple(_hsv(h, u(0.55, 0.8), u(0.55, 0.85)) for h in hues[:3])
        text = (70, 40, 25)
    elif family == "gradient":
        hue = u()
        bg0 = _hsv(hue, u(0.6, 0.9), u(0.75, 0.95))
        bg1 = _hsv(hue + u(0.12, 0.33) * rng.choice([-1, 1]), u(0.6, 0.9), u(0.7, 0.95))
        accents = (_hsv(hue + 0.5, u(0.2, 0.35), 0.98), _hsv(hue + 0.45, u(0.7, 0.9), u(0.35, 0.5)),
                   _hsv(hue + 0.15, u(0.3, 0.5), 0.97))
        text = (252, 252, 252)
    elif family == "bold-geometric":
        primaries = [(220, 40, 40), (245, 200, 20), (30, 70, 180), (20, 20, 24), (245, 245, 240)]
        order = rng.permutation(len(primaries))
        bg0, bg1 = primaries[order[0]], primaries[order[1]]
        accents = tuple(primaries[i] for i in order[2:])
        text = (20, 20, 24)
    elif family == "pastel":
        hue = u()
        bg0 = _hsv(hue, u(0.15, 0.28), u(0.94, 0.98))
        bg1 = _hsv(hue + u(0.1, 0.25), u(0.15, 0.3), u(0.93, 0.98))
        accents = tuple(_hsv(hue + off + u(-0.04, 0.04), u(0.4, 0.6), u(0.82, 0.93)) for off in (0.33, 0.5, 0.7))
        text = _hsv(hue + 0.5, 0.35, 0.35)
    elif family == "dark":
        hue = u(0.58, 0.8)
        bg0 = _hsv(hue, u(0.3, 0.6), u(0.08, 0.16))
        bg1 = _hsv(hue + u(-0.05, 0.05), u(0.4, 0.7), u(0.22, 0.3))
        neon = rng.permutation([0.83, 0.51, 0.3, 0.08, 0.15])
        accents = tuple(_hsv(h, u(0.8, 1.0), u(0.92, 1.0)) for h in neon[:3])
        text = (250, 250, 250) if u() < 0.6 else _hsv(neon[0], 0.5, 1.0)
    else:
        raise ValueError(f"unknown style family {family!r}; known: {', '.join(STYLE_FAMILIES)}")
    mean_bg = mix_rgb(bg0, bg1, 0.5)
    return Palette(background=(bg0, bg1), accents=accents, text=readable_on(mean_bg, text))


@dataclass(frozen=True)
class FamilyStyle:
    """What a style family draws besides its palette: weights over kinds, and fixed traits."""
    backgrounds: dict[str, float]
    textures: dict[str, float]
    layouts: dict[str, float]
    left_aligned: float  # share of posters with left-aligned text
    shadow: bool


FAMILY_STYLES: dict[str, FamilyStyle] = {
    "minimalist": FamilyStyle({"solid": 0.7, "dots": 0.15, "split": 0.15},
                              {"solid": 0.7, "stripes": 0.15, "dots": 0.15},
                              {"title-top": 0.45, "title-bottom": 0.45, "banner": 0.1}, 0.6, False),
    "retro": FamilyStyle({"stripes": 0.4, "solid": 0.3, "dots": 0.3}, {"stripes": 0.5, "solid": 0.3, "dots": 0.2},
                         {"title-top": 0.3, "title-bottom": 0.2, "banner": 0.5}, 0.2, True),
    "gradient": FamilyStyle({"vertical-gradient": 0.45, "diagonal-gradient": 0.4, "radial-gradient": 0.15},
                            {"solid": 0.6, "dots": 0.2, "stripes": 0.2},
                            {"title-top": 0.4, "title-bottom": 0.4, "banner": 0.2}, 0.3, False),
    "bold-geometric": FamilyStyle({"solid": 0.4, "split": 0.4, "stripes": 0.2},
                                  {"checker": 0.35, "stripes": 0.3, "solid": 0.35},
                                  {"title-top": 0.3, "title-bottom": 0.3, "banner": 0.4}, 0.6, True),
    "pastel": FamilyStyle({"vertical-gradient": 0.35, "dots": 0.35, "solid": 0.3},
                          {"dots": 0.4, "solid": 0.4, "stripes": 0.2},
                          {"title-top": 0.4, "title-bottom": 0.4, "banner": 0.2}, 0.3, False),
    "dark": FamilyStyle({"solid": 0.35, "vertical-gradient": 0.35, "dots": 0.3},
                        {"solid": 0.5, "stripes": 0.3, "dots": 0.2},
                        {"title-top": 0.4, "title-bottom": 0.3, "banner": 0.3}, 0.4, False),
}


# ------------------------------------------------------------------------------------------ sampling

def sample_title(rng: np.random.Generator) -> str:
    words = [TITLE_FIRST[rng.integers(len(TITLE_FIRST))]]
    if rng.uniform() < 0.35:
        words.append(TITLE_MIDDLE[rng.integers(len(TITLE_MIDDLE))])
    words.append(TITLE_LAST[rng.integers(len(TITLE_LAST))])
    return " ".join(words)


def sample_subtitle(rng: np.random.Generator) -> str:
    day = f"{WEEKDAYS[rng.integers(7)]} {rng.integers(1, 29)} {MONTHS[rng.integers(12)]}"
    return f"{day} - {VENUES[rng.integers(len(VENUES))]}"


def sample_entities(
    rng: np.random.Generator,
    palette: Palette,
    count: int,
    textures: dict[str, float],
    exclude_shapes: tuple[str, ...] = (),
    texture: str | None = None,
) -> tuple[Entity, ...]:
    """Distinct shapes in accent colours that stand out from the background."""
    shapes = [s for s in SHAPES if s not in exclude_shapes]
    chosen = rng.choice(len(shapes), size=count, replace=False)
    bg = mix_rgb(*palette.background, 0.5)
    colors = [c for c in palette.accents if color_distance(c, bg) > 0.18] or list(palette.accents)
    start = int(rng.integers(len(colors)))
    entities = []
    for k, shape_index in enumerate(chosen):
        color = colors[(start + k) % len(colors)]
        # The texture's second colour is a light or dark variant so the pattern shows at 64 px.
        texture_color = (mix_rgb(color, (255, 255, 255), 0.6) if _luminance(color) < 0.35
                         else mix_rgb(color, (0, 0, 0), 0.5))
        entities.append(Entity(
            shape=shapes[int(shape_index)],
            color=color,
            texture=texture or _pick(rng, textures),
            texture_color=texture_color,
        ))
    return tuple(entities)


def sample_spec(rng: np.random.Generator, family: str | None = None) -> PosterSpec:
    family = family or STYLE_FAMILIES[int(rng.integers(len(STYLE_FAMILIES)))]
    palette = _family_palette(rng, family)
    while not all(_far_from_gray(c) for c in palette.background):
        palette = _family_palette(rng, family)
    style = FAMILY_STYLES[family]
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    return PosterSpec(
        family=family,
        palette=palette,
        background=_pick(rng, style.backgrounds),
        entities=sample_entities(rng, palette, count, style.textures),
        title=sample_title(rng),
        subtitle=sample_subtitle(rng),
        layout=_pick(rng, style.layouts),
        align="left" if rng.uniform() < style.left_aligned else "center",
        shadow=style.shadow,
    )


def restyle_reference(rng: np.random.Generator, spec: PosterSpec) -> PosterSpec:
    """Another poster in the same style (family, palette, background kind, entity texture) but with
    different entities, title and layout: the style reference of the style-driven task."""
    texture = spec.entities[0].texture
    count = int(rng.integers(1, 4))
    entities = sample_entities(rng, spec.palette, count, {texture: 1.0},
                               exclude_shapes=tuple(e.shape for e in spec.entities))
    title = sample_title(rng)
    while title == spec.title:
        title = sample_title(rng)
    layout = [t for t in LAYOUT_TEMPLATES if t != spec.layout][int(rng.integers(len(LAYOUT_TEMPLATES) - 1))]
    return replace(spec, entities=entities, title=title, subtitle=sample_subtitle(rng), layout=layout)


# -------------------------------------------------------------------------------------------- layout

def canvas_size(aspect: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(width, height) with the long side as given and the short side rounded to a multiple of 8
    (latent models downsample by 8); never below 8 px."""
    aw, ah = aspect
    short = max(8, int(np.floor(long_side * min(aw, ah) / max(aw, ah) / 8 + 0.5)) * 8)  # half rounds up
    return (long_side, short) if aw >= ah else (short, long_side)


def _arrange_entities(count: int, area: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    """Square entity boxes (in height units) inside `area`; the first entity is the hero, larger."""
    x0, y0, x1, y1 = area
    w, h = x1 - x0, y1 - y0
    if count == 1:
        cells = [area]
    else:
        hero = 0.58 if count == 2 else 0.55
        if w >= h:
            split = x0 + w * hero
            cells = [(x0, y0, split, y1)]
            rest = (split, y0, x1, y1)
        else:
            split = y0 + h * hero
            cells = [(x0, y0, x1, split)]
            rest = (x0, split, x1, y1)
        if count == 2:
            cells.append(rest)
        else:
            rx0, ry0, rx1, ry1 = rest
            if (rx1 - rx0) >= (ry1 - ry0):
                mid = (rx0 + rx1) / 2
                cells += [(rx0, ry0, mid, ry1), (mid, ry0, rx1, ry1)]
            else:
                mid = (ry0 + ry1) / 2
                cells += [(rx0, ry0, rx1, mid), (rx0, mid, rx1, ry1)]
    boxes = []
    for cx0, cy0, cx1, cy1 in cells:
        side = min(cx1 - cx0, cy1 - cy0) * 0.9
        cx, cy = (cx0 + cx1) / 2, (cy0 + cy1) / 2
        boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return boxes


def _template_regions(layout: str, a: float) -> dict[str, tuple[float, float, float, float]]:
    """Title, subtitle and entity-area rectangles in units where the height is 1 and the width is `a`."""
    m = 0.06 * min(a, 1.0)
    landscape = a > 1.2
    if layout == "title-top":
        if landscape:
            return {"title": (m, 0.2, 0.46 * a, 0.55), "subtitle": (m, 0.62, 0.46 * a, 0.76),
                    "entities": (0.5 * a, m, a - m, 1 - m)}
        return {"title": (m, 0.05, a - m, 0.25), "entities": (m, 0.28, a - m, 0.83),
                "subtitle": (m, 0.86, a - m, 0.95)}
    if layout == "title-bottom":
        if landscape:
            return {"entities": (m, m, 0.5 * a, 1 - m), "title": (0.54 * a, 0.2, a - m, 0.55),
                    "subtitle": (0.54 * a, 0.62, a - m, 0.76)}
        return {"entities": (m, 0.05, a - m, 0.6), "title": (m, 0.63, a - m, 0.83),
                "subtitle": (m, 0.86, a - m, 0.95)}
    if layout == "banner":
        # The title sits on a full-width colour band; in landscape the entities form a row above it.
        return {"entities": (m, 0.04, a - m, 0.56), "title": (m, 0.62, a - m, 0.8),
                "subtitle": (m, 0.86, a - m, 0.95)}
    raise ValueError(f"unknown layout template {layout!r}; known: {', '.join(LAYOUT_TEMPLATES)}")


def banner_band(title_box: Box) -> Box:
    """The full-width band behind a banner title, relative coordinates."""
    return (0.0, max(0.0, title_box[1] - 0.025), 1.0, min(1.0, title_box[3] + 0.025))


def element_boxes(spec: PosterSpec, aspect: float) -> list[ElementBox]:
    """Relative boxes of title, subtitle and each entity for a canvas of width/height `aspect`."""
    regions = _template_regions(spec.layout, aspect)

    def rel(r: tuple[float, float, float, float]) -> Box:
        return (r[0] / aspect, r[1], r[2] / aspect, r[3])

    boxes = [ElementBox("title", rel(regions["title"])), ElementBox("subtitle", rel(regions["subtitle"]))]
    for k, entity_box in enumerate(_arrange_entities(len(spec.entities), regions["entities"])):
        boxes.append(ElementBox(f"entity_{k}", rel(entity_box)))
    return boxes
