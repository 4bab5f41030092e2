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
   declared ``Content-Length``), under connect/read timeouts and a total time budget.

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
import time
from typing import List, Optional
from urllib.parse import urljoin, urlsplit, urlunsplit

from .errors import ImageInputError
from .policy import ImagePolicy
from .sources import read_capped, too_large_error

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


def resolve_host(host: str, port: int) -> List[IPAddress]:
    """All addresses ``host`` resolves to (an IP literal resolves to itself, without DNS)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise ImageInputError(f"Could not resolve image URL host: {host}") from None
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
        raise ImageInputError(f"Could not resolve image URL host: {host}")
    return addresses


class _Hop:
    """One checked hop: the URL as given, plus what is needed to send it to the pinned address."""

    def __init__(self, url: str, policy: ImagePolicy) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ImageInputError("Invalid image URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageInputError(
                f"Unsupported URL scheme {parts.scheme!r}: only http and https URLs are allowed"
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
        addresses = resolve_host(host, port)
        if not policy.allow_private_urls:
            for address in addresses:
                if is_forbidden_address(address):
                    raise ImageInputError(
                        "Image URL host resolves to a private, loopback, link-local or reserved "
                        f"address, which is not allowed: {host}"
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


def _session(hop: _Hop):
    import requests
    from requests.adapters import HTTPAdapter

    class _PinnedAdapter(HTTPAdapter):
        """Sends to the pinned IP but does TLS (SNI + certificate check) for the original name."""

        def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
            if hop.scheme == "https":
                pool_kwargs["server_hostname"] = hop.host
            super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)

    session = requests.Session()
    session.trust_env = False  # no environment proxies / .netrc: they would bypass the pinning
    adapter = _PinnedAdapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ImageInputError("Timed out fetching the image URL")
    return left


def fetch_url(url: str, policy: ImagePolicy) -> bytes:
    """Download ``url`` following the rules in the module docstring; return the body bytes."""
    url = url.strip()
    if not url:
        raise ImageInputError("No image data provided")
    limit = policy.max_download_bytes
    deadline = time.monotonic() + policy.url_total_timeout
    redirects = 0
    while True:
        hop = _Hop(url, policy)
        session = _session(hop)
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
                return _read_body(response, limit, deadline)
        finally:
            session.close()


def _send(session, hop: _Hop, policy: ImagePolicy, deadline: float):
    import requests

    headers = {"Host": hop.host_header, "User-Agent": _USER_AGENT, "Accept": "*/*"}
    last = len(hop.pinned_urls) - 1
    for index, pinned_url in enumerate(hop.pinned_urls):
        connect_timeout = min(policy.url_connect_timeout, _time_left(deadline))
        read_timeout = min(policy.url_read_timeout, _time_left(deadline))
        try:
            return session.get(
                pinned_url,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(connect_timeout, read_timeout),
                verify=_VERIFY,
            )
        except requests.exceptions.SSLError:
            raise ImageInputError(f"TLS error while fetching the image URL: {hop.host}") from None
        except requests.exceptions.ConnectTimeout:
            if index == last:
                raise ImageInputError("Timed out connecting to the image URL host") from None
        except requests.exceptions.Timeout:
            raise ImageInputError("Timed out fetching the image URL") from None
        except requests.exceptions.ConnectionError:
            if index == last:
                raise ImageInputError(f"Could not connect to the image URL host: {hop.host}") from None
        except requests.exceptions.RequestException:
            raise ImageInputError(f"Could not fetch the image URL from {hop.host}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _read_body(response, limit: int, deadline: float) -> bytes:
    import requests

    declared = response.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large_error(limit, "Image download")

    def chunks():
        for chunk in response.iter_content(chunk_size=_CHUNK):
            yield chunk
            _time_left(deadline)

    try:
        data = read_capped(chunks(), limit, "Image download")
    except ImageInputError:
        raise
    except requests.exceptions.Timeout:
        raise ImageInputError("Timed out reading the image URL") from None
    except (requests.exceptions.RequestException, OSError) as exc:
        # requests reports a read timeout inside iter_content as a ConnectionError wrapping
        # urllib3's ReadTimeoutError.
        if _is_timeout(exc):
            raise ImageInputError("Timed out reading the image URL") from None
        raise ImageInputError("Connection error while reading the image URL") from None
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
