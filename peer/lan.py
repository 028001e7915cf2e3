"""The address other machines on the LAN can use to reach an embedded relay."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux: the IPv4 address of an interface


def lan_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses, read from its interfaces (no packet sent)."""
    found: list[str] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            try:
                raw = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            address = socket.inet_ntoa(raw[20:24])
            if not ipaddress.ip_address(address).is_loopback and address not in found:
                found.append(address)
    return found


def best_lan_address() -> str:
    """A private address if there is one (what a neighbour can reach), else any, else the name."""
    addresses = lan_addresses()
    private = [a for a in addresses if ipaddress.ip_address(a).is_private]
    if private:
        return private[0]
    if addresses:
        return addresses[0]
    return socket.gethostname()
