"""Whether an address to listen on keeps a service to this machine (loopback) or offers it to a network."""

from __future__ import annotations

import ipaddress

PEER_ADDRESS_HEADER = "x-chatmesh-peer-address"
"""Set by the gateway on the dev sign-in's requests (overwriting any the client sent) to the address of
the connection it accepted, so that the chat replica behind it can check the caller too: X-Forwarded-For
will not do, as Envoy records a loopback peer there as the machine's own network address."""


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback IPs (127.0.0.0/8, ::1, their IPv4-mapped form); False for
    every other host, including 0.0.0.0 / :: (every interface) and names, which may resolve anywhere."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
