"""What `posterrl data show` prints and draws: per-task counts and a contact sheet."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from posterrl.data.manifest import ManifestRow
from posterrl.data.tasks import REGIME, TASKS

PADDING = 6  # around every cell; a sheet row is cell + 2 * PADDING pixels high
SAMPLE_GAP = 10  # extra space between two samples of one task
LABEL_WIDTH = 132
TARGET_FRAME = (30, 160, 70)
SHEET_BACKGROUND = (250, 250, 250)
REGIME_NAMES = {"local": "local editing", "global": "global creation"}  # as docs/design.md names them


def task_counts(rows: Iterable[ManifestRow]) -> dict[str, int]:
    """Rows per task, every task listed (zeros included) in TASKS order."""
    counts = Counter(row.task for row in rows)
    return {task: counts.get(task, 0) for task in TASKS}


def _fit(image: Image.Image, cell: int) -> Image.Image:
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def contact_sheet(rows: list[ManifestRow], out_png: str | Path, per_task: int = 4, cell: int = 96) -> Path:
    """One sheet row per task present in `rows` (in TASKS order): the task name, then up to
    `per_task` samples, each as its input image(s) followed by its target framed in green."""
    by_task: dict[str, list[ManifestRow]] = {}
    for row in rows:
        if row.task in TASKS and len(by_task.setdefault(row.task, [])) < per_task:
            by_task[row.task].append(row)
    tasks = [task for task in TASKS if task in by_task]
    if not tasks:
        raise ValueError("contact_sheet needs at least one row")
    step = cell + 2 * PADDING

    def sample_width(row: ManifestRow) -> int:
        return (len(row.inputs) + (row.target is not None)) * step + SAMPLE_GAP

    width = LABEL_WIDTH + max(sum(sample_width(row) for row in by_task[task]) for task in tasks)
    sheet = Image.new("RGB", (width, step * len(tasks)), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    label_font, small_font = ImageFont.load_default(size=15), ImageFont.load_default(size=11)
    for line, task in enumerate(tasks):
        top = line * step
        if line:
            draw.line((0, top, width, top), fill=(210, 210, 210))
        draw.text((8, top + step // 2 - 14), task, font=label_font, fill=(20, 20, 20))
        draw.text((8, top + step // 2 + 6), REGIME_NAMES[REGIME[task]], font=small_font, fill=(110, 110, 110))
        x = LABEL_WIDTH
        for row in by_task[task]:
            images = row.load_inputs()
            target = row.load_target()
            for k, image in enumerate(images + ([target] if target is not None else [])):
                thumb = _fit(image, cell)
                left = x + PADDING + (cell - thumb.width) // 2
                upper = top + PADDING + (cell - thumb.height) // 2
                sheet.paste(thumb, (left, upper))
                if k == len(images):
                    draw.rectangle((left - 2, upper - 2, left + thumb.width + 1, upper + thumb.height + 1),
                                   outline=TARGET_FRAME, width=2)
                x += step
            x += SAMPLE_GAP
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
