"""The MCP server (mcp_server/) driven by the MCP SDK's own client, against the real stack.

One stack (supervisord, tiny test model) with an API key, remote images allowed and
MCP_PORT set: supervisord runs the MCP server over Streamable HTTP, and the stdio tests
start `python -m mcp_server --stdio` against the same front end.  Every tool's answer is
compared with what the /v1 route answers for the same input (greedy settings, so the
same input gives the same tokens).
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from mcp_server import http as mcp_http
from mcp_server.images import ImageArgumentError, ImageSource, pixel_coordinates
from mcp_server.service import Service
from mcp_server.tools import Tools, build_server
from shared.config import EXIT_CONFIG
from tests.stack import REPO, free_port, running_stack, wait_for

pytestmark = pytest.mark.timeout(240)

KEY = "mcp-test-key"
IMAGES = REPO / "tests/conformance/main/images"
PHOTO = IMAGES / "photo_773x767.jpg"
SMALL = IMAGES / "small_96x64.png"
PHOTO_SIZE = (773, 767)  # under the drawing's 1024-pixel limit: drawn at full size
TEXT = {"max_tokens": 8, "temperature": 0}  # greedy and short: the same tokens every time, quickly
REGIONS = {"max_objects": 3}  # detect and point are greedy anyway


def data_url(path: Path) -> str:
    kind = "png" if path.suffix == ".png" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


# Each tool call and the /v1 body that must answer the same: (tool, arguments without image).
CALLS = [
    ("caption", {"length": "short", **TEXT}),
    ("query", {"question": "What is in the image?", **TEXT}),
    ("query", {"question": "How many faces?", "reasoning": True, **TEXT}),
    ("detect", {"object": "face", **REGIONS}),
    ("point", {"object": "face", **REGIONS}),
]


def v1_body(tool: str, arguments: dict, image_url: str) -> dict:
    """The /v1 request the tool call stands for."""
    settings = {k: arguments[k] for k in ("max_tokens", "temperature", "max_objects") if k in arguments}
    fields = {k: v for k, v in arguments.items() if k not in settings and k not in ("image", "draw")}
    return {**fields, "image_url": image_url, "settings": settings}


def post_v1(stack, skill: str, body: dict, key: str = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(f"{stack.url}/v1/{skill}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def comparable(answer: dict) -> dict:
    """An answer without what differs between two runs of the same request (its id, timings)."""
    out = {k: v for k, v in answer.items() if k not in ("request_id", "metrics", "pixels")}
    if "metrics" in answer:
        out["tokens"] = (answer["metrics"]["input_tokens"], answer["metrics"]["output_tokens"])
    return out


@pytest.fixture(scope="module")
def stack():
    with running_stack(VLM_API_KEY=KEY, MCP_PORT=free_port(), ALLOW_REMOTE_IMAGES=1) as stack:
        stack.mcp_url = f"http://127.0.0.1:{stack.env['MCP_PORT']}/mcp"
        wait_for(lambda: socket.create_connection(("127.0.0.1", int(stack.env["MCP_PORT"])), 1).close() is None,
                 60, "the MCP server listening", stack)
        yield stack


@contextlib.asynccontextmanager
async def http_session(url: str, key: str = KEY):
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            yield client


def stdio_params(stack, image_dir: Path) -> StdioServerParameters:
    env = {k: v for k, v in stack.env.items() if k != "MCP_PORT"}
    return StdioServerParameters(command=sys.executable, cwd=str(REPO), env=env,
                                 args=["-m", "mcp_server", "--stdio", "--endpoint", stack.url,
                                       "--image-dir", str(image_dir)])


def call_all(connect, image_for) -> list:
    """Each of CALLS through one MCP session: the CallToolResults."""
    async def run():
        async with connect() as client:
            return [await client.call_tool(tool, {"image": image_for(tool), **arguments})
                    for tool, arguments in CALLS]
    return anyio.run(run)


def assert_same_as_v1(stack, results: list) -> None:
    for (tool, arguments), result in zip(CALLS, results):
        assert not result.is_error, result.content
        status, direct = post_v1(stack, tool, v1_body(tool, arguments, data_url(PHOTO)))
        assert status == 200, direct
        assert comparable(result.structured_content) == comparable(direct), tool
        assert result.structured_content["request_id"] != direct["request_id"]
        text = result.content[0].text
        if tool == "caption":
            assert text == direct["caption"]
        elif tool == "query":
            assert text == direct["answer"]
        else:
            found = direct["objects" if tool == "detect" else "points"]
            assert text.startswith(f"{len(found)} 'face' found" if found else "no 'face' found"), text
            # the same boxes or points in pixels of the 773x767 photo, added because the image came as data
            width, height = PHOTO_SIZE
            in_pixels = [{k: round(v * (width if k.startswith("x") else height)) for k, v in item.items()}
                         for item in found]
            pixels = result.structured_content["pixels"]
            assert pixels == {"width": width, "height": height, "objects" if tool == "detect" else "points": in_pixels}


# ---------------------------------------------------------------- Streamable HTTP
def test_lists_the_four_tools_with_schemas(stack):
    async def run():
        async with http_session(stack.mcp_url) as client:
            return (await client.list_tools()).tools
    tools = {tool.name: tool for tool in anyio.run(run)}
    assert set(tools) == {"caption", "query", "detect", "point"}
    for name, tool in tools.items():
        assert tool.description and tool.annotations.read_only_hint
        assert "image" in tool.input_schema["required"]
        assert "variant" in tool.input_schema["properties"]
        assert "file" not in tool.input_schema["properties"]["image"]["description"]  # no paths over HTTP
    assert tools["query"].input_schema["required"] == ["image", "question"]
    assert set(tools["caption"].input_schema["properties"]["length"]["enum"]) == {"short", "normal", "long"}
    assert "objects" in tools["detect"].output_schema["properties"]
    assert "points" in tools["point"].output_schema["properties"]
    assert "draw" in tools["detect"].input_schema["properties"]


def test_each_tool_over_http_answers_as_v1(stack):
    results = call_all(lambda: http_session(stack.mcp_url), lambda tool: data_url(PHOTO))
    assert_same_as_v1(stack, results)


def test_detect_draws_the_boxes_when_asked(stack):
    async def run():
        async with http_session(stack.mcp_url) as client:
            return await client.call_tool("detect", {"image": data_url(PHOTO), "object": "face", "draw": True,
                                                     "max_objects": 2})
    result = anyio.run(run)
    assert not result.is_error
    kinds = [block.type for block in result.content]
    assert kinds == ["text", "image"]
    with Image.open(io.BytesIO(base64.b64decode(result.content[1].data))) as drawn:
        assert drawn.format == "JPEG" and drawn.size == PHOTO_SIZE




def test_an_image_larger_than_the_sdks_default_limit_passes(stack, tmp_path):
    # Noise does not compress: a PNG of ~6 MB, a data URL of ~8 MB, above the SDK's 4 MiB default.
    big = tmp_path / "noise.png"
    Image.frombytes("RGB", (1400, 1400), os.urandom(1400 * 1400 * 3)).save(big)
    image_url = data_url(big)
    assert 4 * 1024 * 1024 < len(image_url) < int(stack.config.max_body_bytes)

    async def run():
        async with http_session(stack.mcp_url) as client:
            return await client.call_tool("point", {"image": image_url, "object": "dot", "max_objects": 1})
    result = anyio.run(run)
    assert not result.is_error, result.content
    status, direct = post_v1(stack, "point", {"image_url": image_url, "object": "dot", "settings": {"max_objects": 1}})
    assert status == 200 and comparable(result.structured_content) == comparable(direct)


def test_an_unknown_variant_is_a_tool_error_with_the_services_message(stack):
    status, direct = post_v1(stack, "caption", {"image_url": data_url(SMALL), "variant": "no-such@1"})
    assert status == 404, direct

    async def run():
        async with http_session(stack.mcp_url) as client:
            return await client.call_tool("caption", {"image": data_url(SMALL), "variant": "no-such@1"})
    result = anyio.run(run)
    assert result.is_error and result.structured_content["error"] == direct["error"]


def test_wrong_or_missing_key_is_refused(stack):
    mcp_port = int(stack.env["MCP_PORT"])
    initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Moondream-Auth": "wrong"}):
        request = urllib.request.Request(f"http://127.0.0.1:{mcp_port}/mcp", data=initialize, headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        assert json.loads(refused.value.read())["error"]["code"] == "unauthorized"

    async def run():
        async with http_session(stack.mcp_url, key="wrong") as client:
            await client.list_tools()
    with pytest.raises(ExceptionGroup) as refused:  # the SDK's client gives up on the 401
        anyio.run(run)
    assert refused.group_contains(MCPError)


HOSTILE_BODIES = [
    b"not json", b"[1,2", b"[]", b"{}", b'{"jsonrpc":"2.0","id":1,"method":"nope"}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"caption","arguments":{"image":5}}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"zzz","arguments":{}}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"detect","arguments":{"image":"x"}}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"caption","arguments":{"image":"data:,"}}}',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"query","arguments":'
    b'{"image":"data:image/png;base64,AAAA","question":"' + b"?" * 5000 + b'"}}}',
]


def test_hostile_requests_get_an_answer_and_leave_the_server_up(stack):
    mcp_port = int(stack.env["MCP_PORT"])
    pid = stack.pid("mcp_server")
    for body in HOSTILE_BODIES:
        request = urllib.request.Request(f"http://127.0.0.1:{mcp_port}/mcp", data=body, headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
            "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                status, answer = resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            status, answer = err.code, json.loads(err.read())
        assert status in (200, 400), (body[:80], status)
        # A JSON-RPC error, or a tool result marked as an error: never a crash, never a hang.
        assert "error" in answer or answer["result"]["isError"] is True, (body[:80], answer)
    assert stack.pid("mcp_server") == pid  # the same process, never restarted
    test_lists_the_four_tools_with_schemas(stack)


def test_a_bad_image_is_a_tool_error_with_the_services_message(stack):
    broken = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not really a png").decode()
    status, direct = post_v1(stack, "caption", {"image_url": broken})
    assert status in (400, 415, 422), direct

    async def run():
        async with http_session(stack.mcp_url) as client:
            return await client.call_tool("caption", {"image": broken})
    result = anyio.run(run)
    assert result.is_error
    assert direct["error"]["message"] in result.content[0].text
    assert result.structured_content["error"] == direct["error"]
    assert result.structured_content["status"] == status and result.structured_content["retryable"] is False


def test_an_ssrf_url_is_refused_by_the_services_rules(stack):
    # Loopback: the service itself, which ALLOW_REMOTE_IMAGES never lets a URL reach.
    url = f"http://127.0.0.1:{stack.port}/static/favicon.png"
    status, direct = post_v1(stack, "detect", {"image_url": url, "object": "face"})
    assert (status, direct["error"]["code"]) == (403, "remote_image_forbidden"), direct

    async def run():
        async with http_session(stack.mcp_url) as client:
            return await client.call_tool("detect", {"image": url, "object": "face"})
    result = anyio.run(run)
    assert result.is_error
    assert result.structured_content["error"] == direct["error"]
    assert result.structured_content["status"] == 403
    assert direct["error"]["message"] in result.content[0].text


def test_a_file_path_is_refused_over_http(stack):
    async def run():
        async with http_session(stack.mcp_url) as client:
            return await client.call_tool("caption", {"image": str(PHOTO)})
    result = anyio.run(run)
    assert result.is_error and result.structured_content["error"]["code"] == "invalid_image_argument"
    assert "data URL" in result.content[0].text


def test_the_overhead_benchmark_runs(stack, tmp_path, capsys):
    from bench import mcp as mcp_bench

    out = tmp_path / "mcp.json"
    results = mcp_bench.main(["--url", stack.url, "--mcp-url", stack.mcp_url, "--api-key", KEY, "--rounds", "2",
                              "--skills", "point", "--json", str(out)])
    assert set(results["point"]) == {"direct", "mcp_http", "mcp_stdio"}
    assert results["point"]["mcp_http"]["ratio"] > 0 and json.loads(out.read_text())["rounds"] == 2
    assert "mcp_stdio" in capsys.readouterr().out


# ---------------------------------------------------------------- stdio
def test_each_tool_over_stdio_answers_as_v1(stack, tmp_path):
    (tmp_path / "photo.jpg").write_bytes(PHOTO.read_bytes())
    # caption by relative path, query by absolute path, detect and point by data URL
    images = {"caption": "photo.jpg", "query": str(tmp_path / "photo.jpg")}
    results = call_all(lambda: Client(stdio_params(stack, tmp_path)), lambda tool: images.get(tool, data_url(PHOTO)))
    assert_same_as_v1(stack, results)


def test_stdio_reads_files_only_inside_its_image_directory(stack, tmp_path):
    inside = tmp_path / "allowed"
    inside.mkdir()
    (inside / "escape.jpg").symlink_to(PHOTO)  # a link out of the directory does not count as inside

    async def run():
        async with Client(stdio_params(stack, inside)) as client:
            return [await client.call_tool("caption", {"image": image, **TEXT})
                    for image in (str(PHOTO), "../../" + PHOTO.name, "escape.jpg", "missing.jpg")]
    for result in anyio.run(run):
        assert result.is_error and result.structured_content["error"]["code"] == "invalid_image_argument"
        assert result.structured_content["retryable"] is False


# ---------------------------------------------------------------- faults, in process
class FakeBusyService(ThreadingHTTPServer):
    """Fault injection: a 'service' that answers every /v1 call 429, as the front end does when full."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                body = json.dumps({"error": {"code": "queue_full", "message": "the queue is full"},
                                   "request_id": "r1"}).encode()
                self.send_response(429)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", "2")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handler)


def in_process_call(endpoint: str, tool: str, arguments: dict):
    """One tool call with the SDK's client on an MCP server built in this process."""
    async def run():
        service = Service(endpoint, "", 10.0)
        server = build_server(Tools(service, ImageSource(None, 1 << 20), 10_000_000), file_paths=False)
        try:
            async with Client(server) as client:
                return await client.call_tool(tool, arguments)
        finally:
            await service.aclose()
    return anyio.run(run)


def test_429_is_reported_as_retryable():
    busy = FakeBusyService()
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    try:
        result = in_process_call(f"http://127.0.0.1:{busy.server_address[1]}", "point",
                                 {"image": data_url(SMALL), "object": "cat"})
    finally:
        busy.shutdown()
    assert result.is_error
    assert result.structured_content == {"error": {"code": "queue_full", "message": "the queue is full"},
                                         "status": 429, "retryable": True, "request_id": "r1", "retry_after": "2"}
    assert "the queue is full" in result.content[0].text and "retryable" in result.content[0].text


def test_an_unreachable_service_is_a_retryable_tool_error():
    result = in_process_call(f"http://127.0.0.1:{free_port()}", "caption", {"image": data_url(SMALL)})
    assert result.is_error and result.structured_content["retryable"] is True
    assert "cannot reach the service" in result.content[0].text


# ---------------------------------------------------------------- the program
def test_image_source_keeps_urls_and_reads_allowed_files(tmp_path):
    (tmp_path / "a.png").write_bytes(SMALL.read_bytes())
    (tmp_path / "notes.txt").write_text("hello")
    source = ImageSource(str(tmp_path), max_bytes=1 << 20)
    assert source.image_url("https://example.com/a.jpg") == "https://example.com/a.jpg"
    assert source.image_url(" data:image/png;base64,AAAA ") == "data:image/png;base64,AAAA"
    assert source.image_url("a.png") == data_url(SMALL)
    assert source.image_url(f"file://{tmp_path}/a.png") == data_url(SMALL)
    for refused in ("notes.txt", "/etc/passwd", "../a.png", str(tmp_path)):
        with pytest.raises(ImageArgumentError):
            source.image_url(refused)
    with pytest.raises(ImageArgumentError, match="larger than"):
        ImageSource(str(tmp_path), max_bytes=10).image_url("a.png")
    with pytest.raises(ImageArgumentError, match="data URL"):
        ImageSource(None, 1 << 20).image_url(str(tmp_path / "a.png"))


def test_pixel_coordinates_follow_the_exif_orientation():
    with Image.open(PHOTO) as photo:
        exif = photo.getexif()
        exif[0x0112] = 6  # "rotate 90": the service sees it 767 wide, 773 high
        turned = io.BytesIO()
        photo.save(turned, format="JPEG", exif=exif)
    answer = {"points": [{"x": 0.5, "y": 1.0}]}
    assert pixel_coordinates(turned.getvalue(), answer) == {"width": 767, "height": 773,
                                                             "points": [{"x": 384, "y": 773}]}
    assert pixel_coordinates(b"not an image", answer) is None


def test_without_a_key_it_listens_on_loopback_only():
    assert mcp_http.listen_host("0.0.0.0", "") == "127.0.0.1"
    assert mcp_http.listen_host("::1", "") == "::1"
    assert mcp_http.listen_host("0.0.0.0", "a-key") == "0.0.0.0"


def run_program(env_overrides: dict, seconds: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_")}
    proc = subprocess.Popen([sys.executable, "-m", "mcp_server"], cwd=REPO, env={**env, **env_overrides},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass
    return proc


def test_without_mcp_port_the_program_only_waits():
    proc = run_program({}, seconds=3)
    try:
        assert proc.poll() is None  # still there: supervisord sees it RUNNING, not down
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert "MCP_PORT is not set" in out


def test_a_taken_mcp_port_exits_78_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run_program({"MCP_PORT": str(taken.getsockname()[1]), "HOST": "127.0.0.1"}, seconds=60)
        out = proc.communicate(timeout=10)[0]
    assert proc.returncode == EXIT_CONFIG, out
    assert "set MCP_PORT to a free port" in out
