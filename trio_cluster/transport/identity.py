"""Runner identity under mutual TLS: does a peer's certificate name the address it claims?

TLS proves that the peer holds a certificate the cluster's CA signed; the
Hello says which runner the peer claims to be. Checking one against the
other means a member cannot pretend to be another member: a dialled peer's
certificate is checked against the dialled host by TLS itself, and an
accepted peer's certificate against the host of the address in its Hello,
here. Names are matched as RFC 6125 asks (subjectAltName only, no common
name; a wildcard covers exactly one leftmost label), IP addresses by value.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["host_of", "identity_problem"]


def host_of(address: str) -> str:
    """The host part of a runner address ``host:port`` (brackets of IPv6 removed)."""
    host = address.rpartition(":")[0] or address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _names(cert: dict[str, Any]) -> tuple[list[str], list[str]]:
    dns: list[str] = []
    ips: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            dns.append(str(value).lower())
        elif kind == "IP Address":
            ips.append(str(value))
    return dns, ips


def _dns_matches(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    if pattern.startswith("*.") and "." in host:
        return host.split(".", 1)[1] == pattern[2:]
    return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def identity_problem(cert: dict[str, Any] | None, claimed_address: str) -> str | None:
    """Why ``cert`` does not prove ``claimed_address``, or None when it does."""
    if not cert:
        return "the peer presented no certificate"
    host = host_of(claimed_address).lower()
    dns, ips = _names(cert)
    try:
        claimed_ip = ipaddress.ip_address(host)
    except ValueError:
        if any(_dns_matches(pattern, host) for pattern in dns):
            return None
    else:
        if any(_ip(ip) == claimed_ip for ip in ips):
            return None
    return f"the peer claims to be {claimed_address}, but its certificate names {dns + ips}"
