"""Fetching a ``url`` image safely (SSRF guard, timeouts, size cap, manual redirects).

For every hop (the first URL and each redirect target):

1. only ``http`` and ``https`` are accepted;
2. the host is resolved once with ``getaddrinfo``; unless ``policy.allow_private_urls``, the hop
   is refused when *any* resolved address is loopback, private, link-local, multicast, reserved,
   unspecified or otherwise not globally routable (IPv4-mapped/compatible, NAT64 and 6to4 IPv6
   addresses are judged by the IPv4 address they carry);
3. the connection is made to an address that was checked (DNS pinning, see below), trying the
   next checked address only when connecting to one fails;
4. redirects (301/302/303/307/308) are not followed by ``requests`` but by this loop, at most
   ``policy.max_redirects`` times, each target going through steps 1-3 again;
5. the body is streamed with a byte cap (``policy.max_download_bytes``, also checked against a
   declared ``Content-Length``), under connect/read timeouts.

One deadline (``policy.url_total_timeout``) covers the whole fetch: name resolution, connecting,
response headers, body and every redirect. Per-read timeouts alone cannot enforce it: a server
that sends one byte a little faster than the read timeout keeps every read alive, whether in the
headers or in a body without a length that ends when the connection closes. So every socket the
fetch opens is registered with a timer that shuts it down when the deadline passes; that wakes
whatever read is blocked on it, and the fetch then reports the timeout (never the truncated data).

DNS rebinding: checking a name and then letting the HTTP library resolve it again would let a
hostile DNS server answer with a public address for the check and a private one for the
connection. We therefore *pin* the checked address: the request goes to a URL whose host is the
IP literal, with the original ``Host`` header, and for HTTPS the TLS layer is told the original
name (``server_hostname``) so that SNI and certificate verification still use the name, not the
IP. Pinning was preferred over checking the connected peer afterwards because by the time the
peer can be inspected the request has already been sent to it. Environment proxies are ignored
(``trust_env = False``): a proxy would resolve the name itself and defeat the pinning.
Credentials written in the URL (``user:pass@``) are not sent, and TLS certificates are always
verified.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import List, Optional
from urllib.parse import urljoin, urlsplit, urlunsplit

from .errors import ImageInputError, clip_for_message
from .policy import ImagePolicy
from .sources import read_capped, reject_lone_surrogates, too_large_error

__all__ = ["fetch_url", "is_forbidden_address", "resolve_host"]

_REDIRECT_CODES = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CHUNK = 64 * 1024
_USER_AGENT = "dots-ocr-server image fetcher"
_MAX_ADDRESSES = 4
#: ``verify`` argument for requests (certificate checking always on); tests may point it at a
#: private CA bundle.
_VERIFY = True

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    # IPv4-compatible (deprecated ::a.b.c.d form), excluding :: and ::1 themselves.
    if int(addr) >> 32 == 0 and int(addr) > 1:
        return ipaddress.IPv4Address(int(addr))
    return None


def is_forbidden_address(addr: IPAddress) -> bool:
    """True when ``addr`` must not be fetched from without ``allow_private_urls``."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None and is_forbidden_address(inner):
            return True
    return (
        addr.is_loopback
        or addr.is_private
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or not addr.is_global
    )


class _Deadline:
    """The one wall-clock deadline of a URL fetch.

    ``left()`` gives the seconds remaining (raising the timeout error once none are); sockets
    passed to ``watch`` are shut down by a timer thread when the deadline passes, which makes a
    read blocked on them return at once. ``close()`` stops the timer and releases the sockets.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        # Duplicates of the watched sockets: shutting a duplicate down shuts the connection down,
        # and it stays valid even after the original is wrapped by TLS (which detaches it) or closed.
        self._watched: List[socket.socket] = []
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def error(self) -> ImageInputError:
        return ImageInputError(
            f"Timed out fetching the image URL: the download did not finish within {self.seconds:g} s"
        )

    def left(self) -> float:
        left = self.end - time.monotonic()
        if self.expired or left <= 0:
            raise self.error()
        return left

    def watch(self, sock: socket.socket) -> None:
        duplicate = sock.dup()
        with self._lock:
            self._watched.append(duplicate)
            if self.expired:
                _shut(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._watched:
                _shut(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._watched:
                sock.close()
            self._watched.clear()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the peer
        pass


def _getaddrinfo_within(host: str, port: int, seconds: Optional[float]):
    """``socket.getaddrinfo`` that gives up after ``seconds`` (None: no limit).

    The C resolver has no timeout argument, so the lookup runs in a daemon thread; on time-out the
    thread is left to finish on its own (the system resolver's own timeouts end it)."""
    if seconds is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    outcome: dict = {}

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread below
            outcome["error"] = exc

    worker = threading.Thread(target=lookup, name="image-url-dns", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError
    if "error" in outcome:
        raise outcome["error"]
    return outcome["infos"]


def resolve_host(host: str, port: int, timeout: Optional[float] = None) -> List[IPAddress]:
    """All addresses ``host`` resolves to (an IP literal resolves to itself, without DNS).

    ``timeout``: seconds to wait for the resolver (None: its own limits); raises TimeoutError."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = _getaddrinfo_within(host, port, timeout)
    except TimeoutError:
        raise
    except (socket.gaierror, UnicodeError, OSError):
        raise ImageInputError(f"Could not resolve image URL host: {clip_for_message(host)}") from None
    addresses: List[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        text = sockaddr[0].split("%", 1)[0]  # drop an IPv6 zone index
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ImageInputError(f"Could not resolve image URL host: {clip_for_message(host)}")
    return addresses


class _Hop:
    """One checked hop: the URL as given, plus what is needed to send it to the pinned address."""

    def __init__(self, url: str, policy: ImagePolicy, deadline: _Deadline) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ImageInputError("Invalid image URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageInputError(
                f"Unsupported URL scheme {clip_for_message(repr(parts.scheme), 40)}: only http and "
                "https URLs are allowed"
                if parts.scheme
                else "Invalid image URL: it must start with http:// or https://"
            )
        host = parts.hostname
        if not host:
            raise ImageInputError("Invalid image URL: it has no host")
        if ":" not in host:  # not an IPv6 literal: normalise international names
            try:
                host = host.rstrip(".").encode("idna").decode("ascii")
            except UnicodeError:
                raise ImageInputError("Invalid image URL: bad host name") from None
            if not host:
                raise ImageInputError("Invalid image URL: it has no host")
        if port is None:
            port = 443 if scheme == "https" else 80
        try:
            addresses = resolve_host(host, port, timeout=deadline.left())
        except TimeoutError:
            raise deadline.error() from None
        if not policy.allow_private_urls:
            for address in addresses:
                if is_forbidden_address(address):
                    raise ImageInputError(
                        "Image URL host resolves to a private, loopback, link-local or reserved "
                        f"address, which is not allowed: {clip_for_message(host)}"
                    )
        self.url = url
        self.scheme = scheme
        self.host = host
        # The Host header carries the name (and a non-default port) as the client wrote it.
        default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
        host_for_header = f"[{host}]" if ":" in host else host
        self.host_header = host_for_header if default_port else f"{host_for_header}:{port}"
        path = parts.path or "/"
        # One URL per checked address, tried in resolver order (a later one only when connecting
        # to the earlier ones failed, e.g. an unreachable IPv6 address).
        self.pinned_urls = []
        for address in addresses[:_MAX_ADDRESSES]:
            literal = f"[{address.compressed}]" if address.version == 6 else address.compressed
            self.pinned_urls.append(urlunsplit((scheme, f"{literal}:{port}", path, parts.query, "")))


def _watched_pools(deadline: _Deadline) -> dict:
    """urllib3 pool classes whose connections register their socket with ``deadline`` as soon as
    the TCP connection is made (before TLS, so a dripping handshake is cut off too).

    ``_new_conn`` is urllib3's one place where a connection's socket is created (1.x and 2.x);
    there is no public hook at that point. tests/test_hardening.py (the dripping origin) fails if it
    stops being called.
    """
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class _WatchedHTTPConnection(HTTPConnection):
        def _new_conn(self):
            sock = super()._new_conn()
            deadline.watch(sock)
            return sock

    class _WatchedHTTPSConnection(HTTPSConnection):
        def _new_conn(self):
            sock = super()._new_conn()
            deadline.watch(sock)
            return sock

    class _WatchedHTTPPool(HTTPConnectionPool):
        ConnectionCls = _WatchedHTTPConnection

    class _WatchedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = _WatchedHTTPSConnection

    return {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


def _session(hop: _Hop, deadline: _Deadline):
    import requests
    from requests.adapters import HTTPAdapter

    class _PinnedAdapter(HTTPAdapter):
        """Sends to the pinned IP but does TLS (SNI + certificate check) for the original name;
        every connection's socket is watched by the fetch's deadline."""

        def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
            if hop.scheme == "https":
                pool_kwargs["server_hostname"] = hop.host
            super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
            self.poolmanager.pool_classes_by_scheme = _watched_pools(deadline)

    session = requests.Session()
    session.trust_env = False  # no environment proxies / .netrc: they would bypass the pinning
    adapter = _PinnedAdapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch_url(url: str, policy: ImagePolicy) -> bytes:
    """Download ``url`` following the rules in the module docstring; return the body bytes."""
    url = url.strip()
    if not url:
        raise ImageInputError("No image data provided")
    reject_lone_surrogates(url, "Image URL")
    deadline = _Deadline(policy.url_total_timeout)
    try:
        return _fetch(url, policy, deadline)
    finally:
        deadline.close()


def _fetch(url: str, policy: ImagePolicy, deadline: _Deadline) -> bytes:
    redirects = 0
    while True:
        hop = _Hop(url, policy, deadline)
        session = _session(hop, deadline)
        try:
            response = _send(session, hop, policy, deadline)
            with response:
                status = response.status_code
                if status in _REDIRECT_CODES:
                    location = response.headers.get("Location")
                    if not location:
                        raise ImageInputError(f"Image URL answered HTTP {status} without a Location")
                    redirects += 1
                    if redirects > policy.max_redirects:
                        raise ImageInputError(
                            f"Too many redirects fetching the image URL (more than {policy.max_redirects})"
                        )
                    url = urljoin(hop.url, location.strip())
                    continue
                if not 200 <= status < 300:
                    raise ImageInputError(f"Image URL answered HTTP {status}; expected a 2xx status")
                return _read_body(response, policy.max_download_bytes, deadline)
        finally:
            session.close()


def _send(session, hop: _Hop, policy: ImagePolicy, deadline: _Deadline):
    import requests

    headers = {"Host": hop.host_header, "User-Agent": _USER_AGENT, "Accept": "*/*"}
    last = len(hop.pinned_urls) - 1
    host = clip_for_message(hop.host)
    for index, pinned_url in enumerate(hop.pinned_urls):
        connect_timeout = min(policy.url_connect_timeout, deadline.left())
        read_timeout = min(policy.url_read_timeout, deadline.left())
        try:
            return session.get(
                pinned_url,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(connect_timeout, read_timeout),
                verify=_VERIFY,
            )
        except (requests.exceptions.RequestException, UnicodeError, ValueError) as exc:
            if deadline.expired:  # the deadline shut the socket down: that is the real cause
                raise deadline.error() from None
            if isinstance(exc, requests.exceptions.SSLError):
                raise ImageInputError(f"TLS error while fetching the image URL: {host}") from None
            if isinstance(exc, requests.exceptions.ConnectTimeout):
                if index == last:
                    raise ImageInputError("Timed out connecting to the image URL host") from None
            elif isinstance(exc, requests.exceptions.Timeout):
                raise ImageInputError("Timed out fetching the image URL") from None
            elif isinstance(exc, requests.exceptions.ConnectionError):
                if index == last:
                    raise ImageInputError(f"Could not connect to the image URL host: {host}") from None
            else:
                raise ImageInputError(f"Could not fetch the image URL from {host}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _read_body(response, limit: int, deadline: _Deadline) -> bytes:
    import requests

    declared = response.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large_error(limit, "Image download")

    def chunks():
        for chunk in response.iter_content(chunk_size=_CHUNK):
            yield chunk
            deadline.left()

    try:
        data = read_capped(chunks(), limit, "Image download")
    except ImageInputError:
        raise
    except (requests.exceptions.RequestException, OSError) as exc:
        if deadline.expired:
            raise deadline.error() from None
        # requests reports a read timeout inside iter_content as a ConnectionError wrapping
        # urllib3's ReadTimeoutError.
        if isinstance(exc, requests.exceptions.Timeout) or _is_timeout(exc):
            raise ImageInputError("Timed out reading the image URL") from None
        raise ImageInputError("Connection error while reading the image URL") from None
    # A body without a length ends when the connection closes, which is also what the deadline's
    # shutdown looks like: the data may be cut short.
    deadline.left()
    if not data:
        raise ImageInputError("Image URL returned an empty body")
    return data


def _is_timeout(exc: BaseException) -> bool:
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (socket.timeout, Urllib3Timeout)):
            return True
        if any(isinstance(a, (socket.timeout, Urllib3Timeout)) for a in getattr(exc, "args", ())):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
