"""This node's network addresses, and which of them a multi-node job should use.

Host names are not to be trusted across nodes: one node may know another only by its short
name, and Debian/Ubuntu map a node's own name to 127.0.1.1. So rank 0 offers every
non-loopback IPv4 address of its node (see :mod:`~spmd_diffusion.distributed.rendezvous`),
each other rank takes the first it can reach, and gloo is told the interface that route
uses (``GLOO_SOCKET_IFNAME``, unless the user set it) instead of binding whatever the host
name resolves to.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct

from spmd_diffusion import envs

logger = logging.getLogger(__name__)

SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def interface_addresses() -> dict[str, str]:
    """``{interface: IPv4 address}`` of every interface that has one (Linux), loopback included."""
    found: dict[str, str] = {}
    try:
        names = [name for _index, name in socket.if_nameindex()]
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            try:
                packed = fcntl.ioctl(
                    probe.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode())
                )
            except OSError:
                continue  # down, or no IPv4 address
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


def resolve(host: str) -> list[str]:
    """IPv4 addresses of ``host`` (empty when it does not resolve)."""
    try:
        return list(
            dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET))
        )
    except OSError:
        return []


def node_addresses() -> list[str]:
    """Addresses other nodes may reach this node at, best first: what this node's name
    resolves to (if it is a real interface address), then every other non-loopback one."""
    local = {address for name, address in interface_addresses().items() if not is_loopback(address)}
    named = [address for address in resolve(socket.gethostname()) if address in local]
    return named + sorted(local - set(named))


def interface_of(address: str) -> str | None:
    """The interface holding ``address`` on this node."""
    return next((name for name, held in interface_addresses().items() if held == address), None)


def source_address(peer: str, port: int = 9) -> str | None:
    """The local address this node's routing table uses to reach ``peer`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((peer, port))
            return probe.getsockname()[0]
    except OSError:
        return None


def use_interface_for_gloo(local_address: str | None) -> str | None:
    """Point gloo at the interface holding ``local_address`` unless ``GLOO_SOCKET_IFNAME``
    is set already; returns the interface gloo will use (None: gloo's own choice)."""
    env = envs.environment()
    if env.get("GLOO_SOCKET_IFNAME"):
        return env["GLOO_SOCKET_IFNAME"]
    name = interface_of(local_address) if local_address and not is_loopback(local_address) else None
    if name is not None:
        env["GLOO_SOCKET_IFNAME"] = name
        logger.debug("gloo uses interface %s (%s)", name, local_address)
    return name


def gloo_interface_towards(peer_host: str | None) -> str | None:
    """Multi-node gloo: the interface this node reaches ``peer_host`` (rank 0's node) from;
    on rank 0's own node (or without a peer), the interface of this node's first address
    (see :func:`node_addresses`). Sets ``GLOO_SOCKET_IFNAME`` unless the user did."""
    local = None
    if peer_host:
        peers = resolve(peer_host)
        own = set(interface_addresses().values())
        if peers and not any(peer in own or is_loopback(peer) for peer in peers):
            local = source_address(peers[0])
    if local is None:
        addresses = node_addresses()
        local = addresses[0] if addresses else None
    chosen = use_interface_for_gloo(local)
    if chosen is None:
        logger.warning(
            "no network interface found for gloo; set GLOO_SOCKET_IFNAME to the interface "
            "that reaches the other nodes"
        )
    return chosen
