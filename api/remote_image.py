"""Fetching an `image_url` that is http(s), when ALLOW_REMOTE_IMAGES is on.

Off by default: a server that fetches URLs for its clients can be made to reach
places its clients cannot (server-side request forgery).  When it is on:

* the host is resolved here, and every address it resolves to must be public
  (`is_public_address`: not private, loopback, link-local, multicast, reserved,
  unspecified, nor otherwise non-global); the connection then goes to the very
  address that was checked, so a second DNS answer cannot swap in another one;
* redirects are followed by hand, at most MAX_REDIRECTS, and each new location
  is checked the same way before anything is sent to it;
* the answer must be 200 with an image/* content type, at most `max_bytes`
  long, and all of it must arrive within `timeout` seconds (checked between
  reads; one read waits at most the time that was left when it connected).

Every refusal is a `RemoteImageError` carrying the HTTP status and error code
the API client gets (400, 403, 413, 415).  The address policy and the resolver
are parameters so that tests can stand in for them (a test that serves images
on loopback passes a policy that allows loopback).
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from typing import Callable, Optional

MAX_REDIRECTS = 3
TIMEOUT_S = 10.0
READ_CHUNK = 64 * 1024
REDIRECTS = (301, 302, 303, 307, 308)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RemoteImageError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to: mapped (::ffff:a.b.c.d), 6to4
    (2002:AABB:CCDD::), NAT64 (64:ff9b::a.b.c.d), IPv4-compatible (::a.b.c.d), Teredo."""
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in NAT64 or ip in IPV4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def is_public_address(ip: IPAddress) -> bool:
    """May the server connect to this address on a client's behalf?  Also judges
    any IPv4 address embedded in an IPv6 one (::ffff:127.0.0.1 is 127.0.0.1)."""
    if isinstance(ip, ipaddress.IPv6Address) and not all(map(is_public_address, embedded_ipv4(ip))):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return True  # judged as the IPv4 address above (the ::ffff:0:0/96 block itself counts as private)
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified) and ip.is_global


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (a literal address resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RemoteImageError(400, "remote_image_unavailable", f"cannot resolve {host!r}: {exc}") from None
    # scope ids (fe80::1%eth0) are cut off: the policy looks at the address itself
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


def checked_address(host: str, port: int, allow_address: Callable[[IPAddress], bool],
                    resolver: Callable[[str, int], list] = resolve) -> IPAddress:
    """The address to connect to for `host`, if every address it has is allowed."""
    addresses = resolver(host, port)
    if not addresses:
        raise RemoteImageError(400, "remote_image_unavailable", f"{host!r} has no address")
    refused = [str(ip) for ip in addresses if not allow_address(ip)]
    if refused:
        raise RemoteImageError(403, "remote_image_forbidden",
                               f"image_url host {host!r} resolves to a non-public address ({', '.join(refused)}); "
                               "only public internet addresses may be fetched")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand, whatever DNS says now."""

    def __init__(self, host: str, address: IPAddress, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = str(address)

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is still checked against the host name."""

    def __init__(self, host: str, address: IPAddress, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = str(address)

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_image(url: str, max_bytes: int, timeout: float = TIMEOUT_S, max_redirects: int = MAX_REDIRECTS,
                allow_address: Callable[[IPAddress], bool] = is_public_address,
                resolver: Callable[[str, int], list] = resolve) -> bytes:
    """The bytes of the image at `url` (http or https), or RemoteImageError."""
    give_up_at = time.monotonic() + timeout
    for _ in range(max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise RemoteImageError(400, "invalid_image_url", "image_url must be http(s) or a data: URL")
        try:
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except ValueError:  # a port that is not a number
            raise RemoteImageError(400, "invalid_image_url", "image_url has an invalid port") from None
        if not host:
            raise RemoteImageError(400, "invalid_image_url", "image_url has no host")
        if parts.username is not None or parts.password is not None:
            raise RemoteImageError(400, "invalid_image_url", "image_url must not carry credentials")
        address = checked_address(host, port, allow_address, resolver)
        connection = (_PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection)(
            host, address, port, timeout=_left(give_up_at))
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers={"Accept": "image/*", "User-Agent": "moondream-serving"})
            response = connection.getresponse()
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise RemoteImageError(400, "remote_image_unavailable", f"redirect {response.status} without a Location")
                url = urllib.parse.urljoin(url, location)
                continue  # checked at the top of the loop, before anything is sent there
            return _read_image(response, max_bytes, give_up_at)
        except RemoteImageError:
            raise
        except (socket.timeout, TimeoutError):
            raise RemoteImageError(400, "remote_image_timeout", f"fetching image_url took longer than {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise RemoteImageError(400, "remote_image_unavailable", f"cannot fetch image_url ({type(exc).__name__})") from None
        finally:
            connection.close()
    raise RemoteImageError(400, "too_many_redirects", f"image_url redirects more than {max_redirects} times")


def _left(give_up_at: float) -> float:
    left = give_up_at - time.monotonic()
    if left <= 0:
        raise TimeoutError("remote image time limit")
    return left


def _read_image(response: http.client.HTTPResponse, max_bytes: int, give_up_at: float) -> bytes:
    if response.status != 200:
        raise RemoteImageError(400, "remote_image_unavailable", f"fetching image_url gave HTTP {response.status}")
    content_type = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
    if not content_type.startswith("image/"):
        raise RemoteImageError(415, "unsupported_media_type",
                               f"image_url answered {content_type or 'no content type'}, not an image")
    too_large = RemoteImageError(413, "image_too_large", f"the image at image_url is larger than {max_bytes} bytes")
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise too_large  # without reading any of it
    data = bytearray()
    while True:
        # read1: what has arrived (one socket read, itself bounded by the socket timeout),
        # so a slow trickle meets the time limit here instead of inside one long read.
        _left(give_up_at)
        piece = response.read1(min(READ_CHUNK, max_bytes + 1 - len(data)))
        if not piece:
            break
        data += piece
        if len(data) > max_bytes:
            raise too_large
    if not data:
        raise RemoteImageError(400, "invalid_image", "the image at image_url is empty")
    return bytes(data)


def fetcher(config) -> Optional[Callable[[str], bytes]]:
    """The front end's fetch function for this config, or None when remote images are off."""
    if not getattr(config, "allow_remote_images", False):
        return None
    # is_public_address is looked up on each call, so a test can stand in for it.
    return lambda url: fetch_image(url, max_bytes=config.max_body_bytes, allow_address=is_public_address)
