"""The geometry of Moondream 2's image tiling and of the frame that carries an image from the
preprocess worker through the broker to the GPU worker: plain arithmetic, no numpy or Pillow,
so the broker can check a frame's size without importing them (shared/image_tiling.py does
the pixels)."""
from __future__ import annotations

import math

CROP_SIZE = 378
PATCH_SIZE = 14
OVERLAP_MARGIN = 4  # patches kept as margin on each side of a local crop
MAX_CROPS = 12  # local crops

MARGIN_PX = OVERLAP_MARGIN * PATCH_SIZE  # 56
WINDOW_PX = (CROP_SIZE // PATCH_SIZE - 2 * OVERLAP_MARGIN) * PATCH_SIZE  # 266
CROP_BYTES = CROP_SIZE * CROP_SIZE * 3


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


def resized_shape(tiling: tuple[int, int]) -> tuple[int, int, int]:
    """(height, width, 3) of the image the local crops of this tiling are cut from."""
    rows, cols = tiling
    return rows * WINDOW_PX + 2 * MARGIN_PX, cols * WINDOW_PX + 2 * MARGIN_PX, 3


# ------------------------------------------------------- the resized frame (preprocess -> broker -> GPU worker)
# The overlapping local crops hold more bytes than the image they are cut from (1.55x for 3 x 3
# crops), so the preprocess worker ships that image and the GPU worker cuts the crops
# (docs/architecture.md).
# One raw uint8 frame, C order: the global crop (378, 378, 3), then the resized image
# (resized_shape(tiling)), then, only when pixels_shape is set, the decoded image (pixels_shape).

def resized_frame_size(tiling, pixels_shape=()) -> int:
    """Bytes of a frame for this tiling (and decoded image); ValueError for a tiling
    select_tiling never gives or a shape that is not (H, W, 3)."""
    if len(tiling) != 2 or not all(isinstance(n, int) and n >= 1 for n in tiling) or tiling[0] * tiling[1] > MAX_CROPS:
        raise ValueError(f"tiling {tuple(tiling)} is not one of 1 to {MAX_CROPS} local crops")
    if pixels_shape and (len(pixels_shape) != 3 or pixels_shape[2] != 3
                         or not all(isinstance(n, int) and n >= 1 for n in pixels_shape)):
        raise ValueError(f"pixels_shape {tuple(pixels_shape)} is not (H, W, 3)")
    height, width, _ = resized_shape(tiling)
    return CROP_BYTES + height * width * 3 + (math.prod(pixels_shape) if pixels_shape else 0)
