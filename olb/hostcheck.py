# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""Ollama's DNS-rebinding protection, applied on olb's own listener.

Ollama listening on a loopback address refuses a request whose `Host` is
not a local name (server/routes.go `allowedHostsMiddleware`, `allowedHost`,
`isLocalIP`): a web page on evil.example that re-resolves its name to
127.0.0.1 reaches the port, but its requests still say `Host: evil.example`.
olb rewrites Host to each backend's own address, so the backend's check
always passes; olb therefore applies the same rule where it listens, and
only when that is a loopback address (Ollama skips the check on any other
bind, 0.0.0.0 included).

The rule, in Ollama's order:
  1. the Host value without its port (Go's net.SplitHostPort; on a split
     error, such as no port, the whole value);
  2. an IP address that is loopback, private (RFC 1918, RFC 4193),
     unspecified, or one of this machine's own addresses: allowed;
  3. "", "localhost", this machine's hostname, or a name under .localhost,
     .local or .internal (case-insensitive): allowed;
  4. anything else: 403 with an empty body (gin's AbortWithStatus).
"""

from __future__ import annotations

import ipaddress
import socket

#: Ollama's answer to a refused Host: c.AbortWithStatus(http.StatusForbidden),
#: no body.
FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n"
FORBIDDEN_CLOSE = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"

#: netip.Addr.IsPrivate: RFC 1918 and RFC 4193, nothing else (Python's
#: is_private is wider: link-local, documentation ranges, ...).
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
#: allowedHost's `tlds`.
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
#: Distinct Host values remembered (a client sending random ones costs a
#: parse each, never memory).
_CACHE_MAX = 1024


def split_host_port(value: str) -> str:
    """The host part of a Host value, as Ollama takes it: net.SplitHostPort's
    host, or the whole value when SplitHostPort fails (no port, too many
    colons, a bracket out of place)."""
    if value.startswith("["):
        end = value.find("]")
        # "[::1]:11434" splits; "[::1]" alone is "missing port": kept whole.
        if end > 0 and value.rfind(":") == end + 1 and "[" not in value[1:] and "]" not in value[end + 1:]:
            return value[1:end]
        return value
    colon = value.rfind(":")
    if colon < 0 or ":" in value[:colon] or "[" in value or "]" in value:
        return value  # missing port, too many colons (a bare IPv6), stray brackets
    return value[:colon]


def parse_ip(host: str):
    """netip.ParseAddr: an IPv4 or IPv6 address (a zone allowed), or None."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # netip's Is* methods read ::ffff:a.b.c.d as a.b.c.d
    return ip


def is_local_ip(ip) -> bool:
    """isLocalIP: an address of one of this machine's interfaces.

    Ollama lists the interfaces; Python has no portable call for that, and
    binding a socket to an address succeeds exactly for local ones.
    """
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


def allowed(host_value: str, hostname: str, local_ip=is_local_ip) -> bool:
    """Would Ollama, listening on loopback, serve a request with this Host?

    Args:
        host_value: the Host header as sent ("" when there is none).
        hostname: this machine's name (os.Hostname()).
        local_ip: isLocalIP, replaceable for tests.
    """
    host = split_host_port(host_value)
    ip = parse_ip(host)
    if ip is not None:
        if ip.is_loopback or ip.is_unspecified or any(ip in n for n in _PRIVATE) or local_ip(ip):
            return True
    host = host.lower()
    if host in ("", "localhost") or host == hostname.lower():
        return True
    return host.endswith(_LOCAL_SUFFIXES)


def listens_on_loopback(address: str) -> bool:
    """Does a listener bound to `address` get the check (allowedHostsMiddleware's
    first test: a loopback listen address)?"""
    ip = parse_ip(address.partition("%")[0])
    return ip is None or ip.is_loopback


class HostCheck:
    """allowed() with the answers remembered per Host value (the hot path
    pays a comparison with the last Host asked about, else one dict lookup:
    each request's Host is a new bytes object, whose hash is computed anew)."""


    def __init__(self, hostname: str | None = None):
        self.hostname = socket.gethostname() if hostname is None else hostname
        self._seen: dict[bytes | None, bool] = {}
        self._last: bytes | None = None
        self._last_ok = False

    def allows(self, host: bytes | None) -> bool:
        if host is not None and host == self._last:
            return self._last_ok
        ok = self._seen.get(host)
        if ok is None:
            ok = allowed(host.decode("latin-1") if host is not None else "", self.hostname)
            if len(self._seen) < _CACHE_MAX:
                self._seen[host] = ok
        self._last, self._last_ok = host, ok
        return ok
