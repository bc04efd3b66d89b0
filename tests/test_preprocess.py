"""Image decoding in the preprocess worker: untrusted bytes in, crops or a clean 4xx out."""
import io

import numpy as np
import pytest
from PIL import Image

from preprocess_worker.worker import ImageRejected, decode_image, preprocess
from shared.image_tiling import pixels_key, tile_image

pytestmark = pytest.mark.timeout(60)

LIMITS = dict(max_pixels=50_000_000, max_side=16384)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def rejected(data: bytes, **limits) -> tuple[int, str]:
    with pytest.raises(ImageRejected) as err:
        decode_image(data, **{**LIMITS, **limits})
    return err.value.status, err.value.code


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode_to_rgb(fmt):
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    decoded = decode_image(encode(image, fmt), **LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (64, 48)


def test_tiling_and_key_match_the_shared_functions():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (500, 700, 3), dtype=np.uint8))
    data = encode(image, "PNG")
    done = preprocess(data, **LIMITS)
    expected = tile_image(image)
    assert done.tiling == expected.tiling and np.array_equal(done.crops, expected.crops)
    assert done.key == pixels_key(image) and done.size_wh == (700, 500)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    decoded = decode_image(encode(image, "JPEG", exif=exif), **LIMITS)
    assert decoded.size == (20, 60)


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(out.getvalue(), **LIMITS)
    assert decoded.getpixel((5, 5))[0] > 200  # red, the first frame


def test_refused_and_broken_inputs():
    tiny = Image.new("RGB", (40, 30))
    assert rejected(b"") == (400, "invalid_image")
    assert rejected(b"hello world, not an image") == (400, "invalid_image")
    assert rejected(encode(tiny, "TIFF")) == (415, "unsupported_image_format")
    assert rejected(b"%!PS-Adobe-3.0 EPSF-3.0\n") == (415, "unsupported_image_format")
    assert rejected(b"<svg xmlns='http://www.w3.org/2000/svg'/>") == (415, "unsupported_image_format")
    assert rejected(encode(Image.new("RGB", (300, 200)), "PNG")[:-30]) == (422, "invalid_image")
    assert rejected(encode(tiny, "PNG"), max_pixels=1000) == (413, "image_too_large")
    assert rejected(encode(tiny, "PNG"), max_side=39) == (413, "image_too_large")


def test_size_is_checked_before_pixels_are_decoded():
    # A PNG header claiming 100000 x 100000 pixels with almost no data: refused from the header alone.
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    assert rejected(bomb, max_side=200_000, max_pixels=20_000_000_000)[0] == 413  # Pillow's bomb check
    assert rejected(bomb) == (413, "image_too_large")
