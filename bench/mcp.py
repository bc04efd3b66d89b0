"""What the MCP server adds to a call: a tool call against the same /v1 call made directly
(numbers in docs/performance.md, "The MCP server").

    .venv/bin/python -m bench.mcp                  # starts the stack (tiny model, API key, MCP_PORT)
    .venv/bin/python -m bench.mcp --url http://127.0.0.1:5000 --mcp-url http://127.0.0.1:8000/mcp --api-key KEY

Each round makes the same request three ways, in turn (so a slow moment of the machine
falls on all three): directly (POST /v1/<skill>, keep-alive), as an MCP tool call over
Streamable HTTP, and as an MCP tool call over stdio (`python -m mcp_server --stdio`, a
child process).  All clients live in this one process and keep their connection or
session open, as an agent's would.  Printed: the median and 90th percentile of each,
and the overhead (median MCP minus median direct, and their ratio).  The request is
short on purpose (a point on a small image, one object), so the model's time does not
hide the overhead; with a real model the same milliseconds are added to seconds.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import statistics
import sys
import time

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.frontend_helpers import SMALL_IMAGE
from tests.stack import REPO, free_port, running_stack

IMAGE_URL = "data:image/png;base64," + base64.b64encode(SMALL_IMAGE.read_bytes()).decode()
WORKLOADS = {
    # skill: (tool arguments, /v1 body)
    "point": ({"image": IMAGE_URL, "object": "dot", "max_objects": 1},
              {"image_url": IMAGE_URL, "object": "dot", "settings": {"max_objects": 1}}),
    "caption": ({"image": IMAGE_URL, "length": "short", "max_tokens": 4, "temperature": 0},
                {"image_url": IMAGE_URL, "length": "short", "settings": {"max_tokens": 4, "temperature": 0}}),
}


def stats(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_ms": round(statistics.median(ordered) * 1000, 2),
            "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000, 2)}


async def measure(url: str, mcp_url: str, api_key: str, env: dict, skill: str, rounds: int) -> dict:
    arguments, body = WORKLOADS[skill]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    stdio = StdioServerParameters(command=sys.executable, cwd=str(REPO), env={**env, "VLM_API_KEY": api_key, "LOG_LEVEL": "WARNING"},
                                  args=["-m", "mcp_server", "--stdio", "--endpoint", url])
    times = {"direct": [], "mcp_http": [], "mcp_stdio": []}
    async with contextlib.AsyncExitStack() as opened:
        direct = await opened.enter_async_context(httpx2.AsyncClient(base_url=url, headers=headers, timeout=120))
        mcp_http = await opened.enter_async_context(httpx2.AsyncClient(headers=headers, timeout=120))
        over_http = await opened.enter_async_context(Client(streamable_http_client(mcp_url, http_client=mcp_http)))
        over_stdio = await opened.enter_async_context(Client(stdio))

        async def call_direct():
            response = await direct.post(f"/v1/{skill}", json=body)
            assert response.status_code == 200, response.text

        async def call_tool(client):
            result = await client.call_tool(skill, arguments)
            assert not result.is_error, result.content

        ways = {"direct": call_direct, "mcp_http": lambda: call_tool(over_http),
                "mcp_stdio": lambda: call_tool(over_stdio)}
        for way in ways.values():  # warm-up: connections, the image cache, first-call imports
            await way()
        for _ in range(rounds):
            for name, way in ways.items():
                started = time.perf_counter()
                await way()
                times[name].append(time.perf_counter() - started)
    result = {name: stats(values) for name, values in times.items()}
    base = result["direct"]["median_ms"]
    for name in ("mcp_http", "mcp_stdio"):
        result[name]["overhead_ms"] = round(result[name]["median_ms"] - base, 2)
        result[name]["ratio"] = round(result[name]["median_ms"] / base, 3)
    return result


def report(results: dict, rounds: int) -> None:
    print(f"{rounds} rounds each; median / p90 per call; overhead = MCP median - direct median")
    for skill, result in results.items():
        print(f"{skill}: direct {result['direct']['median_ms']:.1f} / {result['direct']['p90_ms']:.1f} ms")
        for name in ("mcp_http", "mcp_stdio"):
            r = result[name]
            print(f"  {name:9s} {r['median_ms']:.1f} / {r['p90_ms']:.1f} ms: +{r['overhead_ms']:.1f} ms, "
                  f"x{r['ratio']:.2f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running service (default: start one, tiny model)")
    parser.add_argument("--mcp-url", help="its MCP endpoint (with --url)")
    parser.add_argument("--api-key", default="", help="the service's VLM_API_KEY (with --url)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--skills", default="point,caption")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    skills = args.skills.split(",")
    with contextlib.ExitStack() as stack_scope:
        if args.url:
            url, mcp_url, api_key, env = args.url, args.mcp_url, args.api_key, {}
        else:
            api_key = "bench-key"
            stack = stack_scope.enter_context(running_stack(VLM_API_KEY=api_key, MCP_PORT=free_port()))
            url, mcp_url, env = stack.url, f"http://127.0.0.1:{stack.env['MCP_PORT']}/mcp", stack.env
            wait_mcp(mcp_url)
        env = {k: v for k, v in env.items() if k != "MCP_PORT"}
        results = {skill: anyio.run(measure, url, mcp_url, api_key, env, skill, args.rounds) for skill in skills}
    report(results, args.rounds)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"rounds": args.rounds, "results": results}, out, indent=2)
    return results


def wait_mcp(mcp_url: str, timeout: float = 60.0) -> None:
    """Until the MCP server answers (any HTTP status: it is listening)."""
    end = time.monotonic() + timeout
    while True:
        try:
            httpx2.get(mcp_url, timeout=2)
            return
        except httpx2.HTTPError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    main()
