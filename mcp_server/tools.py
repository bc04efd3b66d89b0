"""The four MCP tools, each one call of the matching /v1 route.

A tool's result holds the /v1 answer body as its structured content (exactly what the
route answered: `caption`; `answer` and `reasoning`; `objects` as fractions; `points`;
plus `request_id`, `metrics`, `finish_reason`) and a short readable summary as text.
detect and point add `pixels` (the same boxes or points in pixels, with the image's size)
when the image came as data, and the image with them drawn when asked (`draw`, off by
default).  A failed call is a tool error (isError) whose text is the service's message
and whose structured content is the service's error, its HTTP status and `retryable`
(true for 429 and 503: the same call may succeed a little later).
"""
# No `from __future__ import annotations` here: the SDK reads the tools' annotations at
# registration, and those built inside build_server() must be real objects by then.

import base64
import logging
import time
from typing import Annotated, Any, Literal, Optional

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from mcp_server.images import ImageArgumentError, ImageSource, data_url_bytes, draw_answer, pixel_coordinates
from mcp_server.service import Service, ServiceError

log = logging.getLogger("mcp_server")

INSTRUCTIONS = (
    "Moondream, a small vision-language model, served for your team. Give it an image and it "
    "captions it (caption), answers questions about it (query), finds objects with boxes (detect) or "
    "points at them (point). Coordinates are fractions of the image's width and height (0..1, "
    "from the top left). Each call goes to a shared server: a result marked retryable means it was busy.")

IMAGE_HELP = ("The image: a base64 data URL (data:image/jpeg;base64,...), or an http(s) URL the server "
              "fetches (where its operator allows remote images; public addresses only)")
STDIO_IMAGE_HELP = IMAGE_HELP + ", or a path of an image file under {dir}"

SUMMARY_LIMIT = 20  # boxes or points listed in the text; the structured content has them all


# ---------------------------------------------------------------- answers (the tools' output schemas)
class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")  # the /v1 body as it is, new fields included
    request_id: str


class CaptionAnswer(_Answer):
    caption: str
    finish_reason: Optional[str] = None
    metrics: Optional[dict[str, Any]] = None


class QueryAnswer(_Answer):
    answer: str
    reasoning: Any = Field(None, description="the grounded reasoning (with reasoning=true)")
    finish_reason: Optional[str] = None
    metrics: Optional[dict[str, Any]] = None


class Box(BaseModel):
    x_min: float
    y_min: float
    x_max: float
    y_max: float


class Point(BaseModel):
    x: float
    y: float


class DetectAnswer(_Answer):
    objects: list[Box] = Field(description="boxes as fractions of the image's width and height")
    pixels: Optional[dict[str, Any]] = Field(None, description=(
        "width, height and the same objects in pixels (rounded), when the image was sent as data"))


class PointAnswer(_Answer):
    points: list[Point] = Field(description="points as fractions of the image's width and height")
    pixels: Optional[dict[str, Any]] = Field(None, description=(
        "width, height and the same points in pixels (rounded), when the image was sent as data"))


# ---------------------------------------------------------------- arguments shared by the tools
Variant = Annotated[Optional[str], Field(
    description="A fine-tuned variant of the model to use (an id like 'ft-alpha@100', as GET /v1/models "
                "lists them); leave out for the base model", max_length=128)]
MaxTokens = Annotated[Optional[int], Field(description="Most tokens to write (default 768)", ge=1)]
Temperature = Annotated[Optional[float], Field(description="Sampling temperature, 0 = always the most likely "
                                                           "words (default 0.5)", ge=0)]
MaxObjects = Annotated[Optional[int], Field(description="Most objects to return (default 50)", ge=1)]
Draw = Annotated[bool, Field(description="Also return the image with the answer drawn on it (costs tokens to "
                                         "read; needs the image as a data URL or file)")]
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=False,
                            open_world_hint=False)


def settings(**given) -> dict:
    """The /v1 `settings` object: only what the caller gave (the service fills in the rest)."""
    return {name: value for name, value in given.items() if value is not None}


class Tools:
    """The tool bodies: one /v1 call each, with the answer or the error shaped for MCP."""

    def __init__(self, service: Service, images: ImageSource, max_image_pixels: int):
        self.service = service
        self.images = images
        self.max_image_pixels = max_image_pixels

    async def run(self, skill: str, image: str, body: dict, summary, draw: bool = False) -> CallToolResult:
        started = time.monotonic()
        try:
            image_url = self.images.image_url(image)
            request = {name: value for name, value in body.items() if value is not None}
            answer = await self.service.call(skill, {**request, "image_url": image_url})
        except ImageArgumentError as exc:
            outcome = ServiceError(400, "invalid_image_argument", str(exc), from_service=False)
        except ServiceError as exc:
            outcome = exc
        else:
            drawing = None
            if skill in ("detect", "point"):
                drawing = await self.add_pixels(image_url, answer, draw)
            content = [TextContent(type="text", text=summary(answer))] + ([drawing] if drawing else [])
            log.info("tool %s ok", skill, extra={"tool": skill, "request_id": answer.get("request_id"),
                                                  "duration_ms": round((time.monotonic() - started) * 1000, 1)})
            return CallToolResult(content=content, structured_content=answer)
        log.info("tool %s failed: HTTP %s %s", skill, outcome.status, outcome.code,
                 extra={"tool": skill, "request_id": outcome.request_id})
        return error_result(outcome)

    async def add_pixels(self, image_url: str, answer: dict, draw: bool) -> TextContent | ImageContent | None:
        """Where we have the image (a data URL or file): `pixels` added to the answer, and the
        drawing when asked for.  Decoding a large photo takes a while: off the event loop."""
        image_bytes = await anyio.to_thread.run_sync(data_url_bytes, image_url)
        if image_bytes is None:
            return TextContent(type="text", text="(no drawing: the server does not fetch URLs itself; send "
                                                 "the image as a data URL to get one)") if draw else None
        pixels = await anyio.to_thread.run_sync(pixel_coordinates, image_bytes, answer)
        if pixels is not None:
            answer["pixels"] = pixels
        if not draw:
            return None
        try:
            jpeg = await anyio.to_thread.run_sync(draw_answer, image_bytes, answer, self.max_image_pixels)
        except Exception as exc:  # Pillow's errors are many; a drawing is a courtesy, never a failure
            return TextContent(type="text", text=f"(no drawing: {type(exc).__name__})")
        return ImageContent(type="image", data=base64.b64encode(jpeg).decode(), mime_type="image/jpeg")


def error_result(error: ServiceError) -> CallToolResult:
    text = f"{error.message} ({f'HTTP {error.status}, ' if error.from_service else ''}{error.code})"
    if error.retryable:
        wait = f"in {error.retry_after} s" if error.retry_after else "in a few seconds"
        text += f"; retryable: the service is busy or restarting, call again {wait}"
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=error.as_dict(),
                          is_error=True)


# ---------------------------------------------------------------- summaries (the text content)
def caption_text(answer: dict) -> str:
    return answer["caption"]


def query_text(answer: dict) -> str:
    return answer["answer"]


def objects_text(what: str, items: list, describe) -> str:
    if not items:
        return f"no {what} found"
    lines = [f"{len(items)} {what} found ({'; '.join(describe(item) for item in items[:SUMMARY_LIMIT])})"]
    if len(items) > SUMMARY_LIMIT:
        lines.append(f"... and {len(items) - SUMMARY_LIMIT} more in the structured content")
    return " ".join(lines)


FRACTIONS = " (fractions of the image's width and height)"


def detect_text(thing: str):
    def text(answer: dict) -> str:
        pixels = answer.get("pixels")
        if pixels:  # the same boxes in pixels: what a screen or an image editor needs
            return objects_text(f"'{thing}'", pixels["objects"], lambda b: (
                f"box x {b['x_min']}-{b['x_max']}, y {b['y_min']}-{b['y_max']}")) + \
                f" (pixels of the {pixels['width']}x{pixels['height']} image; fractions in the structured content)"
        return objects_text(f"'{thing}'", answer["objects"], lambda b: (
            f"box x {b['x_min']:.3f}-{b['x_max']:.3f}, y {b['y_min']:.3f}-{b['y_max']:.3f}")) + FRACTIONS
    return text


def point_text(thing: str):
    def text(answer: dict) -> str:
        pixels = answer.get("pixels")
        if pixels:
            return objects_text(f"'{thing}'", pixels["points"], lambda p: f"at x {p['x']}, y {p['y']}") + \
                f" (pixels of the {pixels['width']}x{pixels['height']} image; fractions in the structured content)"
        return objects_text(f"'{thing}'", answer["points"], lambda p: f"at x {p['x']:.3f}, y {p['y']:.3f}") + FRACTIONS
    return text


# ---------------------------------------------------------------- the server
def build_server(tools: Tools, file_paths: bool) -> MCPServer:
    """An MCPServer offering caption, query, detect and point through `tools`."""
    image_help = STDIO_IMAGE_HELP.format(dir=tools.images.image_dir) if file_paths else IMAGE_HELP
    Image = Annotated[str, Field(description=image_help, min_length=1)]
    server = MCPServer("moondream", title="Moondream", instructions=INSTRUCTIONS, version="1")

    @server.tool(description="Describe an image in words (Moondream's caption).", annotations=READ_ONLY)
    async def caption(image: Image,
                      length: Annotated[Literal["short", "normal", "long"], Field(
                          description="short: one sentence; normal: a paragraph; long: in detail")] = "normal",
                      max_tokens: MaxTokens = None, temperature: Temperature = None,
                      variant: Variant = None) -> Annotated[CallToolResult, CaptionAnswer]:
        body = {"length": length, "settings": settings(max_tokens=max_tokens, temperature=temperature),
                "variant": variant}
        return await tools.run("caption", image, body, caption_text)

    @server.tool(description="Answer a question about an image (Moondream's query): what it shows, "
                             "reading text in it, counting, comparing, yes/no questions.", annotations=READ_ONLY)
    async def query(image: Image,
                    question: Annotated[str, Field(description="The question about the image", min_length=1)],
                    reasoning: Annotated[bool, Field(
                        description="Think (grounded in the image) before answering: slower, better on hard "
                                    "questions; the reasoning comes back in the structured content")] = False,
                    max_tokens: MaxTokens = None, temperature: Temperature = None,
                    variant: Variant = None) -> Annotated[CallToolResult, QueryAnswer]:
        body = {"question": question, "reasoning": reasoning,
                "settings": settings(max_tokens=max_tokens, temperature=temperature), "variant": variant}
        return await tools.run("query", image, body, query_text)

    @server.tool(description="Find every instance of an object in an image, as bounding boxes "
                             "(x_min, y_min, x_max, y_max as fractions of the width and height).",
                 annotations=READ_ONLY)
    async def detect(image: Image,
                     object: Annotated[str, Field(description="What to find, e.g. 'face', 'red car'", min_length=1)],
                     max_objects: MaxObjects = None, variant: Variant = None,
                     draw: Draw = False) -> Annotated[CallToolResult, DetectAnswer]:
        body = {"object": object, "settings": settings(max_objects=max_objects), "variant": variant}
        return await tools.run("detect", image, body, detect_text(object), draw)

    @server.tool(description="Point at every instance of an object in an image: its centre (x, y as "
                             "fractions of the width and height). Good for counting and for clicking.",
                 annotations=READ_ONLY)
    async def point(image: Image,
                    object: Annotated[str, Field(description="What to point at, e.g. 'person', 'OK button'",
                                                 min_length=1)],
                    max_objects: MaxObjects = None, variant: Variant = None,
                    draw: Draw = False) -> Annotated[CallToolResult, PointAnswer]:
        body = {"object": object, "settings": settings(max_objects=max_objects), "variant": variant}
        return await tools.run("point", image, body, point_text(object), draw)

    return server
