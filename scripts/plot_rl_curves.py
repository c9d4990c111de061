"""Curves of an rl stage from its run directory, as one PNG (PIL only, no plotting library).

x is the rl epoch (0: the distilled student RL starts from). Left: the held-out gold metric (mean over
tasks) at every evaluation. Right: the learned reward, on the same held-out samples (served by the
reward server) and on each epoch's rollouts (a 5-epoch moving average: every epoch draws other
prompts). A learned reward that rises while the gold metric does not is reward hacking.

    python scripts/plot_rl_curves.py RUN_DIR [--out curves.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def panel(title: str, series: dict[str, list[tuple[float, float]]], size=(520, 360)) -> Image.Image:
    """One line chart: series name -> [(x, y)]."""
    width, height = size
    left, right, top, bottom = 60, 16, 30, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    points = [(x, y) for values in series.values() for x, y in values]
    if not points:
        draw.text((left, top), f"{title}: no data", fill="black", font=font)
        return image
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    pad = (y1 - y0) * 0.08 or 0.01
    y0, y1, x1 = y0 - pad, y1 + pad, x1 if x1 > x0 else x0 + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(120, 120, 120))
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        draw.text((4, at(x0, y)[1] - 6), f"{y:.3f}", fill="black", font=font)
        x = x0 + (x1 - x0) * i / 4
        draw.text((at(x, y0)[0] - 12, height - bottom + 4), f"{x:.0f}", fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    draw.text((width // 2 - 30, height - bottom + 20), "rl epoch", fill="black", font=font)
    for index, (name, values) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        shown = [at(x, y) for x, y in values]
        if len(shown) > 1:
            draw.line(shown, fill=color, width=2)
        for x, y in shown:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((left + 190 * index, height - 22), f"-- {name}", fill=color, font=font)
    return image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    summary = json.loads((args.run_dir / "summary.json").read_text())
    history = summary["stages"]["rl"]["history"]
    table = summary["stages"]["eval"]["final_table"]
    last = history[-1]["epoch"]
    gold = ([(0, table["student"]["gold"]["mean"])] + [(h["epoch"], h["gold"]) for h in history if "gold" in h]
            + [(last, table["after RL"]["gold"]["mean"])])
    served = ([(0, table["student"]["reward"]["mean"])]
              + [(h["epoch"], h["eval_reward"]) for h in history if h.get("eval_reward") is not None]
              + [(last, table["after RL"]["reward"]["mean"])])
    rollout = np.array([np.nan if h["reward"] is None else h["reward"] for h in history])
    smooth = [(h["epoch"], float(np.nanmean(rollout[max(0, i - 4) : i + 1]))) for i, h in enumerate(history)]
    sheet = Image.new("RGB", (1040, 360), "white")
    sheet.paste(panel("held-out gold metric, mean of 6 tasks", {"gold (held-out)": gold}), (0, 0))
    sheet.paste(panel("learned reward", {"held-out (served)": served, "rollouts (5-epoch mean)": smooth}), (520, 0))
    out = args.out or args.run_dir / "rl_curves.png"
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
