"""olb.hostcheck without sockets: Ollama's allowedHostsMiddleware rule, as a table."""

import ipaddress

import pytest

from olb.hostcheck import HostCheck, allowed, listens_on_loopback, split_host_port

HOSTNAME = "gpubox"
LOCAL = {ipaddress.ip_address("203.0.113.9")}  # stands for one of this machine's public addresses


def local_ip(ip):
    return ip in LOCAL


@pytest.mark.parametrize("value,host", [
    ("example.com", "example.com"),          # missing port: the whole value
    ("example.com:11434", "example.com"),
    ("example.com:", "example.com"),
    ("[::1]:11434", "::1"),
    ("[::1]", "[::1]"),                      # missing port
    ("::1", "::1"),                          # too many colons
    ("[::1]:1:2", "[::1]:1:2"),              # too many colons
    ("a[b:1", "a[b:1"),                      # unexpected [
    ("", ""),
])
def test_split_host_port_like_go(value, host):
    assert split_host_port(value) == host


@pytest.mark.parametrize("value,ok", [
    # IPs: loopback, private (RFC 1918, 4193), unspecified, a local interface's
    ("127.0.0.1", True), ("127.8.9.10:80", True), ("[::1]:11434", True), ("::1", True),
    ("10.1.2.3", True), ("172.16.0.1", True), ("172.32.0.1", False), ("192.168.0.9:80", True),
    ("[fd00::1]:80", True), ("0.0.0.0", True), ("[::]:11434", True), ("::ffff:127.0.0.1", True),
    ("203.0.113.9:11434", True), ("203.0.113.10", False), ("8.8.8.8", False),
    ("169.254.1.1", False), ("100.64.0.1", False),   # wider than Go's IsPrivate
    ("[::1]", False),                                # no port: "[::1]" is no address, no name
    # names
    ("", True), ("localhost", True), ("LocalHost:11434", True), ("gpubox", True), ("GPUBOX:80", True),
    ("app.localhost", True), ("box.local:11434", True), ("ollama.internal", True), ("x.INTERNAL", True),
    ("localhost.example.com", False), ("evil.example", False), ("local", False), ("internal", False),
    ("gpubox.example", False), ("evil.example:11434", False),
])
def test_allowed_names_match_ollama(value, ok):
    assert allowed(value, HOSTNAME, local_ip) is ok


@pytest.mark.parametrize("address,checked", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("0.0.0.0", False), ("::", False),
    ("10.0.0.5", False), ("fe80::1%eth0", False),
])
def test_only_a_loopback_listener_checks(address, checked):
    assert listens_on_loopback(address) is checked


def test_answers_are_remembered_and_bounded():
    check = HostCheck(HOSTNAME)
    assert check.allows(b"localhost:11434") and not check.allows(b"evil.example") and check.allows(None)
    for i in range(3000):
        assert not check.allows(b"e%d.example" % i)
    assert len(check._seen) == 1024


def test_this_machines_own_addresses_pass():
    # 127.0.0.1 passes as loopback anyway; what matters is that a bind test
    # says yes for an address of this host and no for one that is not.
    from olb.hostcheck import is_local_ip
    assert is_local_ip(ipaddress.ip_address("127.0.0.1"))
    assert not is_local_ip(ipaddress.ip_address("192.0.2.77"))  # TEST-NET-1, never assigned
