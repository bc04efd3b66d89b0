"""Moondream 2's image tiling: an RGB image -> uint8 crops, and the frame that carries
them from the preprocess worker to the GPU worker.  No torch here, so the
CPU preprocess workers can run it.  See docs/model.md, "Image
preprocessing"; the conformance fixtures pin the output bit for bit."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from shared.tiling_geometry import CROP_BYTES, CROP_SIZE, WINDOW_PX, resized_frame_size, resized_shape, select_tiling


@dataclass
class TiledImage:
    crops: np.ndarray  # uint8 (1 + rows*cols, 378, 378, 3): global crop, then row-major local crops
    tiling: tuple[int, int]  # (rows, cols)


@dataclass
class ResizedForTiling:
    """What the local crops are cut from: the global crop and the one resized image."""
    global_crop: np.ndarray  # uint8 (378, 378, 3)
    resized: np.ndarray  # uint8 resized_shape(tiling): the whole image at the tiling's size
    tiling: tuple[int, int]  # (rows, cols)


def resize_for_tiling(image: Image.Image) -> ResizedForTiling:
    """The two LANCZOS resizes of the reference: to the global crop and to the tiling's size."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    tiling = select_tiling(height, width)
    target_h, target_w, _ = resized_shape(tiling)
    return ResizedForTiling(global_crop=np.asarray(image.resize((CROP_SIZE, CROP_SIZE), Image.LANCZOS)),
                            resized=np.asarray(image.resize((target_w, target_h), Image.LANCZOS)), tiling=tiling)


def cut_crops(global_crop: np.ndarray, resized: np.ndarray, tiling: tuple[int, int]) -> np.ndarray:
    """uint8 (1 + rows*cols, 378, 378, 3): the global crop, then the overlapping local crops
    (stride 266, row-major) cut from `resized`, zero padded where they run past its edge.
    A new writable array: the inputs may be read-only views of a received frame."""
    rows, cols = tiling
    crops = np.zeros((1 + rows * cols, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    crops[0] = global_crop
    for i in range(rows):
        for j in range(cols):
            y0, x0 = i * WINDOW_PX, j * WINDOW_PX
            piece = resized[y0:y0 + CROP_SIZE, x0:x0 + CROP_SIZE]
            crops[1 + i * cols + j, :piece.shape[0], :piece.shape[1]] = piece
    return crops


def tile_image(image: Image.Image) -> TiledImage:
    """Global crop plus overlapping local crops, exactly as the reference cuts them."""
    r = resize_for_tiling(image)
    return TiledImage(crops=cut_crops(r.global_crop, r.resized, r.tiling), tiling=r.tiling)


def resized_frame(resized: ResizedForTiling, pixels: Optional[np.ndarray] = None) -> bytes:
    """The frame a preprocess worker sends (layout: shared/tiling_geometry.py)."""
    parts = [resized.global_crop, resized.resized] + ([pixels] if pixels is not None else [])
    return b"".join(memoryview(np.ascontiguousarray(part)).cast("B") for part in parts)


def split_resized_frame(frame, tiling, pixels_shape=()) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A received frame -> (crops, decoded image or None), both new writable arrays;
    ValueError if the frame does not have the size its message announces."""
    size = resized_frame_size(tiling, pixels_shape)
    if frame is None or len(frame) != size:
        raise ValueError(f"resized frame of {0 if frame is None else len(frame)} bytes, expected {size}")
    data = np.frombuffer(frame, dtype=np.uint8)
    shape = resized_shape(tiling)
    resized_end = CROP_BYTES + math.prod(shape)
    crops = cut_crops(data[:CROP_BYTES].reshape(CROP_SIZE, CROP_SIZE, 3),
                      data[CROP_BYTES:resized_end].reshape(shape), tuple(tiling))
    pixels = data[resized_end:].reshape(tuple(pixels_shape)).copy() if pixels_shape else None
    return crops, pixels


def pixels_key(image: Image.Image) -> str:
    """Cache key for an image's encoded prefix: a hash of its decoded RGB pixels and size."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    digest = hashlib.sha256()
    digest.update(f"{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
