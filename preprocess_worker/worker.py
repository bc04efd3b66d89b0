"""Preprocess worker: untrusted image bytes -> the resized images the GPU worker cuts its crops from.

One job at a time (capacity 1).  The decode runs on a helper thread so this
loop keeps heartbeating while a large image is resized; Pillow releases the GIL
for the heavy parts.  Any failure becomes an Error reply: a bad image never
takes the process down.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from shared import protocol
from shared.broker_link import BrokerLink
from shared.image_tiling import ResizedForTiling, cut_crops, pixels_key, resize_for_tiling, resized_frame
from shared.protocol import Error, PreprocessJob, Preprocessed

log = logging.getLogger("preprocess_worker")

ALLOWED_FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP"]

# Magic numbers of image formats we recognise but refuse (415 rather than 400).
_REFUSED_MAGIC = {
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"8BPS": "PSD", b"%!PS": "EPS", b"\xc5\xd0\xd3\xc6": "EPS",
    b"%PDF": "PDF", b"\x00\x00\x01\x00": "ICO", b"\x00\x00\x00\x0cjP": "JPEG 2000", b"\xff\x4f\xff\x51": "JPEG 2000",
    b"qoif": "QOI", b"\x76\x2f\x31\x01": "OpenEXR",
}


class ImageRejected(Exception):
    """An image we will not process; carries the HTTP status and error code for the client."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class PreprocessedImage:
    resized: ResizedForTiling  # the global crop and the image the local crops are cut from
    key: str
    size_wh: tuple[int, int]
    pixels: Optional[np.ndarray] = None  # the decoded RGB image, when asked for

    @property
    def tiling(self) -> tuple[int, int]:
        return self.resized.tiling

    @property
    def crops(self) -> np.ndarray:
        """The crops the GPU worker cuts from this result's frame (a new array each time): for
        code that runs the engine in process (tests, benchmarks)."""
        return cut_crops(self.resized.global_crop, self.resized.resized, self.resized.tiling)


def _refused_format(data: bytes) -> Optional[str]:
    head = data[:16]
    for magic, name in _REFUSED_MAGIC.items():
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    if head.lstrip().startswith((b"<svg", b"<?xml")):
        return "SVG"
    return None


def decode_image(data: bytes, max_pixels: int, max_side: int) -> Image.Image:
    """Untrusted bytes -> an RGB Pillow image, or ImageRejected.  The size is checked
    from the header before any pixel is decoded."""
    if not data:
        raise ImageRejected(400, "invalid_image", "the image is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a warning is already too big
        try:
            image = Image.open(BytesIO(data), formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(413, "image_too_large", f"image too large: {exc}") from None
        except Exception:
            refused = _refused_format(data)
            if refused:
                raise ImageRejected(415, "unsupported_image_format",
                                    f"{refused} images are not supported (use JPEG, PNG, WebP, GIF or BMP)") from None
            raise ImageRejected(400, "invalid_image", "the data is not a readable image") from None
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected(400, "invalid_image", "the image has no pixels")
        if width * height > max_pixels or width > max_side or height > max_side:
            raise ImageRejected(413, "image_too_large",
                                f"image is {width}x{height}; limits are {max_pixels} pixels and {max_side} per side")
        try:
            image.seek(0)  # first frame of an animation
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(413, "image_too_large", f"image too large: {exc}") from None
        except Exception as exc:  # truncated or corrupt data; plugins raise many exception types
            raise ImageRejected(422, "invalid_image", f"the image data is corrupt ({type(exc).__name__})") from None


# Decoding runs on a helper thread, whose glibc malloc arena keeps the pages of a
# big image after it is freed (hundreds of MiB per worker): hand them back.
BIG_IMAGE_PIXELS = 4_000_000


def release_freed_memory() -> None:
    # A failed decode leaves the image in a reference cycle (exception -> traceback ->
    # frame -> image): collect it first, then hand the pages back.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def preprocess(data: bytes, max_pixels: int, max_side: int, want_pixels: bool = False) -> PreprocessedImage:
    image = decode_image(data, max_pixels, max_side)
    return PreprocessedImage(resized=resize_for_tiling(image), key=pixels_key(image), size_wh=image.size,
                             pixels=np.asarray(image) if want_pixels else None)


class PreprocessWorker:
    def __init__(self, config, context=None):
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.trim_pending = False  # give freed memory back once the failed job is forgotten
        self.pending: list[tuple[PreprocessJob, bytes]] = []  # jobs not started (normally at most one)
        self.running: Optional[tuple[PreprocessJob, Future, float]] = None
        self.stopping = False
        self.link = BrokerLink(config, protocol.PREPROCESS, capacity=lambda: 1, context=context)

    def run(self) -> None:
        while not self.stopping:
            # Short polls while decoding (to reply as soon as it is done), long ones when idle.
            wait = 0.005 if self.running else min(0.25, self.config.heartbeat_interval)
            for msg, blob in self.link.receive(wait):
                if isinstance(msg, PreprocessJob):
                    self.pending.append((msg, bytes(blob) if blob is not None else b""))
                # Cancel and anything else: jobs are short; the broker drops stale replies.
            self._finish_running()
            if self.trim_pending and self.running is None:
                # after the failed job's exception (and the image its traceback holds) is gone
                self.trim_pending = False
                release_freed_memory()
            self._give_up_if_stuck()
            self._start_next()
            if self.link.keep_alive():
                self.pending.clear()  # a new broker does not know these jobs
                self.running = None
        self.link.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _start_next(self) -> None:
        while self.running is None and self.pending:
            job, data = self.pending.pop(0)
            if job.deadline and time.time() > job.deadline:
                # The broker has answered 504 already; a reply (any) frees us there.
                self.link.send(Error(job.request_id, 504, "timeout", "request timed out before preprocessing"))
                continue
            future = self.executor.submit(preprocess, data, self.config.max_image_pixels, self.config.max_image_side,
                                          job.want_pixels)
            self.running = (job, future, time.monotonic())

    def _give_up_if_stuck(self) -> None:
        """A decode thread cannot be interrupted: past the time limit the process exits,
        supervisord starts a fresh one and the broker retries or fails the job."""
        if self.running is not None and time.monotonic() - self.running[2] > self.config.preprocess_timeout:
            log.error("request %s: preprocessing took over %.1f s; exiting", self.running[0].request_id,
                      self.config.preprocess_timeout)
            os._exit(3)

    def _finish_running(self) -> None:
        if self.running is None or not self.running[1].done():
            return
        job, future, started = self.running
        self.running = None
        elapsed_ms = (time.monotonic() - started) * 1000
        try:
            result = future.result()
        except ImageRejected as exc:
            log.info("request %s: image rejected: %s", job.request_id, exc.message)
            self.trim_pending = True  # a failed decode may have allocated the whole image first
            self.link.send(Error(job.request_id, exc.status, exc.code, exc.message))
            return
        except Exception as exc:  # a bug or an exotic failure: answer, keep serving
            log.exception("request %s: preprocessing failed", job.request_id)
            self.trim_pending = True
            self.link.send(Error(job.request_id, 422, "invalid_image", f"could not process the image ({type(exc).__name__})"))
            return
        if result.size_wh[0] * result.size_wh[1] >= BIG_IMAGE_PIXELS:
            release_freed_memory()
        reply = Preprocessed(request_id=job.request_id, tiling=result.resized.tiling, image_key=result.key,
                             size_wh=result.size_wh, preprocess_ms=round(elapsed_ms, 2))
        if result.pixels is not None:  # the transformers engine wants the image itself, at the end of the frame
            reply.pixels_shape = tuple(result.pixels.shape)
        self.link.send(reply, resized_frame(result.resized, result.pixels))
