"""Remote image URLs (api/remote_image.py): off by default; when on, only
public addresses, checked again on every redirect, with size, type and time limits.

No test here sends anything to a non-loopback address.  The address policy is
tested as a function (literal addresses, and host names through a resolver
stand-in); the fetching is tested against a local HTTP server that the tests
allow with `ALLOW_LOOPBACK_FOR_TEST`, a stand-in for the public-address policy.
"""
from __future__ import annotations

import dataclasses
import http.server
import ipaddress
import json
import threading
import time

import falcon.testing
import pytest

from api import remote_image
from frontend.app import create_app
from api.remote_image import RemoteImageError, checked_address, fetch_image, is_public_address
from shared.config import load_config

pytestmark = pytest.mark.timeout(60)

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
                    "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082")


# ---------------------------------------------------------------- the address policy
@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1",                      # loopback
    "10.1.2.3", "172.16.0.1", "192.168.1.1", "fc00::1",   # private
    "169.254.169.254", "fe80::1",                          # link-local (cloud metadata lives here)
    "224.0.0.1", "ff02::1",                                # multicast
    "0.0.0.0", "::",                                       # unspecified
    "240.0.0.1", "255.255.255.255",                        # reserved, broadcast
    "100.64.0.1",                                          # shared address space (carrier NAT)
    "::ffff:127.0.0.1", "::ffff:10.0.0.1",                 # IPv4-mapped IPv6
    "2002:7f00:1::", "64:ff9b::a00:1", "::127.0.0.1",      # 6to4, NAT64, IPv4-compatible leading to private ones
    "192.0.2.1", "2001:db8::1",                            # documentation
])
def test_non_public_addresses_are_refused(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "2002:808:808::1"])
def test_public_addresses_are_allowed(address):
    assert is_public_address(ipaddress.ip_address(address))


def resolver_stand_in(table: dict):
    """Stands in for DNS: host name -> addresses, no network involved."""
    def resolve(host, port):
        return [ipaddress.ip_address(a) for a in table[host]]
    return resolve


def test_host_names_are_judged_by_every_address_they_resolve_to():
    resolve = resolver_stand_in({
        "public.test": ["93.184.216.34"],
        "internal.test": ["10.0.0.7"],
        "rebind.test": ["93.184.216.34", "127.0.0.1"],  # one bad record is enough to refuse
        "metadata.test": ["169.254.169.254"],
        "nothing.test": [],
    })
    assert str(checked_address("public.test", 80, is_public_address, resolve)) == "93.184.216.34"
    for host in ("internal.test", "rebind.test", "metadata.test"):
        with pytest.raises(RemoteImageError) as err:
            checked_address(host, 80, is_public_address, resolve)
        assert err.value.status == 403 and err.value.code == "remote_image_forbidden"
        assert host in err.value.message and "non-public" in err.value.message
    with pytest.raises(RemoteImageError) as err:
        checked_address("nothing.test", 80, is_public_address, resolve)
    assert err.value.status == 400


def test_literal_and_local_hosts_resolve_to_what_they_say():
    # Real resolution, but only of names that never leave the machine.
    assert ipaddress.ip_address("127.0.0.1") in remote_image.resolve("127.0.0.1", 80)
    assert all(ip.is_loopback for ip in remote_image.resolve("localhost", 80))
    for url in ("http://127.0.0.1/x.png", "http://localhost:1/x.png", "http://[::1]/x.png",
                "http://0.0.0.0/x.png", "https://127.1/x.png", "http://2130706433/x.png"):  # 2130706433 = 127.0.0.1
        with pytest.raises(RemoteImageError) as err:
            fetch_image(url, max_bytes=1000, timeout=2)
        assert err.value.status == 403, url


@pytest.mark.parametrize("url, code", [
    ("ftp://example.test/a.png", "invalid_image_url"),
    ("http:///a.png", "invalid_image_url"),
    ("http://user:pw@example.test/a.png", "invalid_image_url"),
    ("http://example.test:notaport/a.png", "invalid_image_url"),
])
def test_malformed_urls_are_400_before_any_lookup(url, code):
    def no_dns(host, port):
        pytest.fail(f"resolved {host}")
    with pytest.raises(RemoteImageError) as err:
        fetch_image(url, max_bytes=1000, resolver=no_dns)
    assert (err.value.status, err.value.code) == (400, code)


# ---------------------------------------------------------------- fetching, against a local server
def ALLOW_LOOPBACK_FOR_TEST(ip) -> bool:
    """Test stand-in for is_public_address: allows 127.0.0.1 (our local server) and nothing else."""
    return str(ip) == "127.0.0.1"


class ImageServer(http.server.ThreadingHTTPServer):
    """Serves a PNG, redirects, wrong types, big and slow bodies on 127.0.0.1."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.paths: list[str] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes = b"", content_type: str = "image/png", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.paths.append(self.path)
        path, _, query = self.path.partition("?")
        if path == "/image.png":
            self.send(200, PNG)
        elif path.startswith("/hops/"):  # /hops/N redirects N times, then the image
            n = int(path.rsplit("/", 1)[1])
            self.send(302, headers={"Location": f"/hops/{n - 1}" if n > 0 else "/image.png"})
        elif path == "/to":  # redirect to ?url=...
            self.send(302, headers={"Location": query.split("=", 1)[1]})
        elif path == "/page.html":
            self.send(200, b"<html></html>", "text/html")
        elif path == "/big.png":
            self.send(200, PNG + b"\0" * 5000)
        elif path == "/chunked-big.png":  # no Content-Length: the limit must hold while reading
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"\0" * 1000)
            self.close_connection = True
        elif path == "/slow.png":  # headers at once, then a trickle
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif path == "/missing.png":
            self.send(404, b"nope", "text/plain")
        else:
            self.send(500, b"?", "text/plain")


@pytest.fixture(scope="module")
def server():
    srv = ImageServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetch(url, **kw):
    return fetch_image(url, **{"max_bytes": 2000, "timeout": 5, "allow_address": ALLOW_LOOPBACK_FOR_TEST, **kw})


def refused(url, **kw) -> RemoteImageError:
    with pytest.raises(RemoteImageError) as err:
        fetch(url, **kw)
    return err.value


def test_an_allowed_server_is_fetched(server):
    assert fetch(server.base + "/image.png") == PNG


def test_the_default_policy_refuses_the_same_server(server):
    before = len(server.paths)
    with pytest.raises(RemoteImageError) as err:
        fetch_image(server.base + "/image.png", max_bytes=2000, timeout=5)
    assert err.value.status == 403 and "non-public" in err.value.message
    assert len(server.paths) == before  # refused before connecting


def test_up_to_three_redirects_are_followed(server):
    assert fetch(server.base + "/hops/2") == PNG  # 3 redirects: /hops/2, /1, /0, then the image
    err = refused(server.base + "/hops/3")
    assert (err.status, err.code) == (400, "too_many_redirects")


@pytest.mark.parametrize("target", [
    "http://127.0.0.2:{port}/image.png",  # loopback, but not what the stand-in allows
    "http://10.0.0.1/image.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:{port}/image.png",
])
def test_every_redirect_is_checked_before_it_is_followed(server, target):
    target = target.format(port=server.server_address[1])
    before = len(server.paths)
    err = refused(f"{server.base}/to?url={target}")
    assert (err.status, err.code) == (403, "remote_image_forbidden")
    assert server.paths[before:] == [f"/to?url={target}"]  # only the first hop was fetched


def test_redirect_to_another_scheme_is_refused(server):
    assert refused(f"{server.base}/to?url=file:///etc/passwd").code == "invalid_image_url"


def test_not_an_image_is_415(server):
    assert (refused(server.base + "/page.html").status, refused(server.base + "/page.html").code) == (415, "unsupported_media_type")


def test_too_large_is_413_with_or_without_a_length(server):
    assert refused(server.base + "/big.png").status == 413
    assert refused(server.base + "/chunked-big.png").status == 413


def test_a_slow_server_hits_the_time_limit(server):
    started = time.monotonic()
    err = refused(server.base + "/slow.png", timeout=1.0)
    assert err.code == "remote_image_timeout" and err.status == 400
    assert time.monotonic() - started < 3


def test_http_errors_and_closed_ports_are_400(server):
    assert refused(server.base + "/missing.png").code == "remote_image_unavailable"
    with http.server.HTTPServer(("127.0.0.1", 0), Handler) as closed:
        port = closed.server_address[1]
    assert refused(f"http://127.0.0.1:{port}/image.png").code == "remote_image_unavailable"


# ---------------------------------------------------------------- through the front end
class SubmitRecorder:
    """Stands in for BrokerClient: records what would be submitted and answers 503."""

    def __init__(self):
        self.images = []

    def submit(self, msg, image):
        self.images.append(image)
        return _Failing(msg.request_id)

    def status(self, timeout=1.0):
        return None

    def close(self):
        pass


class _Failing:
    """A reply stream whose only event is a 503."""

    def __init__(self, request_id):
        self.request_id = request_id

    def next_event(self, timeout):
        from shared.protocol import Error
        return Error(self.request_id, 503, "no_gpu_worker", "stand-in")

    def cancel(self):
        pass


def post(client, url):
    return client.simulate_post("/v1/caption", body=json.dumps({"image_url": url}),
                                headers={"Content-Type": "application/json"})


def test_off_by_default():
    assert load_config().allow_remote_images is False
    config = load_config()
    client = falcon.testing.TestClient(create_app(config, SubmitRecorder()))
    result = post(client, "http://127.0.0.1:1/image.png")
    assert result.status_code == 400 and result.json["error"]["code"] == "remote_image_disabled"


def test_enabled_front_end_refuses_loopback_with_a_clear_message(server):
    config = dataclasses.replace(load_config(), allow_remote_images=True)
    broker = SubmitRecorder()
    client = falcon.testing.TestClient(create_app(config, broker))
    before = len(server.paths)
    result = post(client, server.base + "/image.png")
    assert result.status_code == 403, result.text
    assert result.json["error"]["code"] == "remote_image_forbidden"
    assert "non-public address (127.0.0.1)" in result.json["error"]["message"]
    assert broker.images == [] and len(server.paths) == before


def test_enabled_front_end_submits_the_fetched_bytes(server, monkeypatch):
    # The policy stand-in again, so the local server counts as allowed.
    monkeypatch.setattr(remote_image, "is_public_address", ALLOW_LOOPBACK_FOR_TEST)
    config = dataclasses.replace(load_config(), allow_remote_images=True)
    broker = SubmitRecorder()
    client = falcon.testing.TestClient(create_app(config, broker))
    result = post(client, server.base + "/hops/1")
    assert result.status_code == 503  # the stand-in broker's answer: the request got that far
    assert broker.images == [PNG]
