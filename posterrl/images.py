"""Image <-> tensor conversions shared by every role, and labelled grids.

Policies work on a square canvas of side R. A poster of any aspect ratio is letterboxed into it
(centred, padded with neutral gray, which is 0 in the policy's [-1, 1] range) so that one batch
can hold posters of several aspect ratios; outputs are cropped back to the wanted aspect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PAD_GRAY = (128, 128, 128)


def content_box(aspect_w: float, aspect_h: float, side: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) that an image of this aspect occupies in a side x side canvas."""
    if aspect_w >= aspect_h:
        w, h = side, max(1, round(side * aspect_h / aspect_w))
    else:
        w, h = max(1, round(side * aspect_w / aspect_h)), side
    x0, y0 = (side - w) // 2, (side - h) // 2
    return x0, y0, x0 + w, y0 + h


def letterbox(image: Image.Image, side: int) -> Image.Image:
    canvas = Image.new("RGB", (side, side), PAD_GRAY)
    box = content_box(image.width, image.height, side)
    canvas.paste(image.convert("RGB").resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR), box[:2])
    return canvas


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> PIL RGB (values outside the range are clipped)."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def canvas_tensor(image: Image.Image, side: int) -> torch.Tensor:
    """Letterboxed canvas as a (3, side, side) tensor in [-1, 1]."""
    return pil_to_tensor(letterbox(image, side))


def uncanvas(tensor: torch.Tensor, aspect: Sequence[float], size: tuple[int, int] | None = None) -> Image.Image:
    """Crop a (3, R, R) canvas back to an image of the given aspect [w, h], optionally resized to size (w, h)."""
    image = tensor_to_pil(tensor)
    crop = image.crop(content_box(aspect[0], aspect[1], tensor.shape[-1]))
    return _resized(crop, size)


def uncanvas_detailed(canvas: torch.Tensor, canvas_input: torch.Tensor, frame_input: Image.Image,
                      size: tuple[int, int] | None = None) -> Image.Image:
    """The edit of a one-input residual sample at the input's own resolution (model.input_detail): `frame_input`
    (already in the output's frame) plus the change the canvas made to it, (canvas - canvas_input), upsampled.
    What the edit leaves alone keeps the detail a small canvas cannot hold; optionally resized to size (w, h)."""
    x0, y0, x1, y1 = content_box(frame_input.width, frame_input.height, canvas.shape[-1])
    change = (canvas.float() - canvas_input.float())[None, :, y0:y1, x0:x1]  # (1, 3, h, w) on the canvas
    change = torch.nn.functional.interpolate(change, size=(frame_input.height, frame_input.width), mode="bilinear",
                                             align_corners=False)[0]  # (3, H, W) at the input's resolution
    return _resized(tensor_to_pil(pil_to_tensor(frame_input) + change), size)


def _resized(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    return image.resize(size, Image.Resampling.BILINEAR) if size is not None and image.size != tuple(size) else image


def labelled_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[Sequence[str]] | None = None,
                  cell: int = 96, header: int = 14) -> Image.Image:
    """Rows of images, each letterboxed into a cell, with an optional caption above each cell.

    A caption may have several lines ("\n"); every line gets `header` pixels and is cut to fit the cell.
    """
    n_cols = max(len(r) for r in rows)
    lines = max((label.count("\n") + 1 for row in labels for label in row), default=1) if labels is not None else 0
    top = header * lines
    sheet = Image.new("RGB", (n_cols * cell, len(rows) * (cell + top)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=max(8, header - 4))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            x, y = j * cell, i * (cell + top)
            sheet.paste(letterbox(image, cell), (x, y + top))
            if labels is not None and j < len(labels[i]):
                for k, line in enumerate(labels[i][j].split("\n")):
                    draw.text((x + 2, y + 1 + k * header), line[: cell // 6], fill=(0, 0, 0), font=font)
    return sheet
