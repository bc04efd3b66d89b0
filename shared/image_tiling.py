"""Moondream 2's image tiling: an RGB image -> uint8 crops.  No torch here, so the
CPU preprocess workers can run it.  See ../shared/docs/moondream2-model.md, "Image
preprocessing"; the conformance fixtures pin the output bit for bit."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

CROP_SIZE = 378
PATCH_SIZE = 14
OVERLAP_MARGIN = 4  # patches kept as margin on each side of a local crop
MAX_CROPS = 12  # local crops

MARGIN_PX = OVERLAP_MARGIN * PATCH_SIZE  # 56
WINDOW_PX = (CROP_SIZE // PATCH_SIZE - 2 * OVERLAP_MARGIN) * PATCH_SIZE  # 266


@dataclass
class TiledImage:
    crops: np.ndarray  # uint8 (1 + rows*cols, 378, 378, 3): global crop, then row-major local crops
    tiling: tuple[int, int]  # (rows, cols)


def select_tiling(height: int, width: int, max_crops: int = MAX_CROPS) -> tuple[int, int]:
    """(rows, cols) of local crops for an image of this size."""
    h = height - 2 * MARGIN_PX
    w = width - 2 * MARGIN_PX
    if h <= WINDOW_PX or w <= WINDOW_PX:
        return 1, 1
    min_rows = math.ceil(h / WINDOW_PX)
    min_cols = math.ceil(w / WINDOW_PX)
    if min_rows * min_cols > max_crops:
        scale = math.sqrt(max_crops / (min_rows * min_cols))
        return max(1, math.floor(min_rows * scale)), max(1, math.floor(min_cols * scale))
    rows = max(math.floor(math.sqrt(max_crops * h / w)), min_rows)
    cols = max(math.floor(math.sqrt(max_crops * w / h)), min_cols)
    if rows * cols > max_crops:
        if cols > rows:
            cols = math.floor(max_crops / rows)
        else:
            rows = math.floor(max_crops / cols)
    return rows, cols


def tile_image(image: Image.Image) -> TiledImage:
    """Global crop plus overlapping local crops, exactly as the reference cuts them."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    rows, cols = select_tiling(height, width)

    crops = np.zeros((1 + rows * cols, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    crops[0] = np.asarray(image.resize((CROP_SIZE, CROP_SIZE), Image.LANCZOS))

    target_w = cols * WINDOW_PX + 2 * MARGIN_PX
    target_h = rows * WINDOW_PX + 2 * MARGIN_PX
    resized = np.asarray(image.resize((target_w, target_h), Image.LANCZOS))
    for i in range(rows):
        for j in range(cols):
            y0, x0 = i * WINDOW_PX, j * WINDOW_PX
            piece = resized[y0:y0 + CROP_SIZE, x0:x0 + CROP_SIZE]  # zero padding where it runs past the edge
            crops[1 + i * cols + j, :piece.shape[0], :piece.shape[1]] = piece
    return TiledImage(crops=crops, tiling=(rows, cols))


def pixels_key(image: Image.Image) -> str:
    """Cache key for an image's encoded prefix: a hash of its decoded RGB pixels and size."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    digest = hashlib.sha256()
    digest.update(f"{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
