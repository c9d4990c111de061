"""The eval and rollout grids a run's TensorBoard shows at its last step, as one PNG for the docs.

Reads the image summaries of `<run>/tb` (what a user sees under IMAGES in TensorBoard): the newest
`eval/<task>` sheet of every task (inputs, output with its gold, target) and the newest rollout group of
each task (`rollout/<task>/group0`), side by side under their tags.

    python scripts/grids_from_run.py RUN_DIR [--out grids.png] [--rows 2]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from posterrl.data.tasks import TASKS


def newest_image(events: EventAccumulator, tag: str) -> tuple[int, Image.Image] | None:
    if tag not in events.Tags()["images"]:
        return None
    event = events.Images(tag)[-1]
    return event.step, Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("grids.png"))
    parser.add_argument("--rows", type=int, default=2, help="eval rows (prompts) kept per task")
    args = parser.parse_args()
    events = EventAccumulator(str(args.run_dir / "tb"), size_guidance={"images": 0}).Reload()
    font = ImageFont.load_default(size=14)
    panels = []
    for task in TASKS:
        for tag in (f"eval/{task}", f"rollout/{task}/group0"):
            found = newest_image(events, tag)
            if found is None:
                continue
            step, image = found
            if tag.startswith("eval/"):  # one sheet row per prompt: keep the first few
                row_height = image.height // max(1, round(image.height / 110))
                image = image.crop((0, 0, image.width, min(image.height, args.rows * row_height)))
            caption = Image.new("RGB", (image.width, 20), "white")
            ImageDraw.Draw(caption).text((2, 2), f"{tag} (step {step})", fill="black", font=font)
            panel = Image.new("RGB", (image.width, image.height + 20), "white")
            panel.paste(caption, (0, 0))
            panel.paste(image, (0, 20))
            panels.append(panel)
    if not panels:
        raise SystemExit(f"{args.run_dir / 'tb'}: no eval/<task> or rollout/<task>/group0 images")
    pairs = [panels[i : i + 2] for i in range(0, len(panels), 2)]
    width = max(sum(p.width for p in pair) + 10 for pair in pairs)
    height = sum(max(p.height for p in pair) + 10 for pair in pairs)
    sheet = Image.new("RGB", (width, height), "white")
    y = 0
    for pair in pairs:
        x = 0
        for panel in pair:
            sheet.paste(panel, (x, y))
            x += panel.width + 10
        y += max(p.height for p in pair) + 10
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"{args.out}: {len(panels)} grids, {sheet.width} x {sheet.height}")


if __name__ == "__main__":
    main()
