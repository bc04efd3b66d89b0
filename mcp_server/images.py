"""A tool's `image` argument -> the service's `image_url`, and the optional drawn answer.

* A data URL travels as it is: the service decodes it.
* An http(s) URL travels as it is too: the service fetches it, with its own SSRF rules
  (api/remote_image.py, only where ALLOW_REMOTE_IMAGES is on).  We never fetch
  URLs here, so this program cannot be used to reach what the service may not.
* A file path is read here, only by the stdio server and only inside MCP_IMAGE_DIR
  (after resolving links and `..`), and sent as a data URL.
"""
from __future__ import annotations

import base64
import io
import mimetypes
from pathlib import Path
from typing import Optional


class ImageArgumentError(ValueError):
    """An `image` argument this program will not turn into an image_url (the message says why)."""


class ImageSource:
    """Turns `image` arguments into image_urls; `image_dir` None: file paths are refused."""

    def __init__(self, image_dir: Optional[str], max_bytes: int):
        self.image_dir = Path(image_dir).expanduser().resolve() if image_dir else None
        self.max_bytes = max_bytes

    def image_url(self, image: str) -> str:
        text = image.strip()
        scheme = text.split(":", 1)[0].lower() if ":" in text else ""
        if scheme in ("data", "http", "https"):
            return text
        if self.image_dir is None:
            raise ImageArgumentError("image must be a data URL (data:image/jpeg;base64,...) or an http(s) URL; "
                                     "file paths work only with the stdio server started with an image directory")
        return self._read_file(text[len("file://"):] if scheme == "file" else text)

    def _read_file(self, name: str) -> str:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else self.image_dir / path
        try:
            path = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise ImageArgumentError(f"no such image file: {name}") from None
        if not path.is_relative_to(self.image_dir):
            raise ImageArgumentError(f"image files are read only from {self.image_dir}")
        if not path.is_file():
            raise ImageArgumentError(f"not a file: {name}")
        mime_type = mimetypes.guess_type(path.name)[0] or ""
        if not mime_type.startswith("image/"):
            raise ImageArgumentError(f"not an image file (by its name): {name}")
        if path.stat().st_size > self.max_bytes:
            raise ImageArgumentError(f"image file larger than {self.max_bytes} bytes: {name}")
        return f"data:{mime_type};base64," + base64.b64encode(path.read_bytes()).decode()


def data_url_bytes(image_url: str) -> Optional[bytes]:
    """The bytes of a base64 data URL (one the service has already accepted), else None."""
    header, comma, data = image_url.partition(",")
    if not header.lower().startswith("data:") or not comma:
        return None
    try:
        return base64.b64decode("".join(data.split()))
    except ValueError:
        return None


EXIF_ORIENTATION = 0x0112
TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def oriented_size(image_bytes: bytes) -> Optional[tuple[int, int]]:
    """(width, height) as the service sees the image (EXIF orientation applied), from its
    header alone; None when Pillow cannot tell."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            width, height = image.size
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in TURNED
    except Exception:  # Pillow's errors are many; the service judged the image already
        return None
    return (height, width) if turned else (width, height)


def pixel_coordinates(image_bytes: bytes, answer: dict) -> Optional[dict]:
    """The answer's boxes or points in pixels: {"width", "height", "objects" | "points"}."""
    size = oriented_size(image_bytes)
    if size is None:
        return None
    width, height = size
    if "objects" in answer:
        return {"width": width, "height": height, "objects": [
            {"x_min": round(b["x_min"] * width), "y_min": round(b["y_min"] * height),
             "x_max": round(b["x_max"] * width), "y_max": round(b["y_max"] * height)} for b in answer["objects"]]}
    return {"width": width, "height": height, "points": [
        {"x": round(p["x"] * width), "y": round(p["y"] * height)} for p in answer.get("points", [])]}


DRAWN_MAX_SIDE = 1024  # enough to see the boxes; keeps the tool result small
DRAW_COLOR = (255, 40, 40)


def draw_answer(image_bytes: bytes, answer: dict, max_pixels: int) -> bytes:
    """JPEG of the image with the answer's boxes (detect) or points (point) drawn on it.

    The service has decoded these bytes already, within its limits; the pixel limit is
    checked again here before decoding.  EXIF orientation is applied as the service
    applies it, so the fractions land where the model put them."""
    from PIL import Image, ImageDraw, ImageOps

    with Image.open(io.BytesIO(image_bytes)) as opened:
        if opened.width * opened.height > max_pixels:
            raise ValueError("image too large to draw")
        image = ImageOps.exif_transpose(opened).convert("RGB")
    image.thumbnail((DRAWN_MAX_SIDE, DRAWN_MAX_SIDE))
    width, height = image.size
    pen = max(2, round(max(width, height) / 250))
    draw = ImageDraw.Draw(image)
    for box in answer.get("objects", []):
        draw.rectangle([box["x_min"] * width, box["y_min"] * height, box["x_max"] * width, box["y_max"] * height],
                       outline=DRAW_COLOR, width=pen)
    for point in answer.get("points", []):
        x, y, r = point["x"] * width, point["y"] * height, 3 * pen
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 255), fill=DRAW_COLOR, width=max(1, pen // 2))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
