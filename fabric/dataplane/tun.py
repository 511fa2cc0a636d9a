"""Linux multiqueue TUN devices (IFF_MULTI_QUEUE): create, configure, open one queue."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
# Every packet read or written carries a struct virtio_net_hdr (fabric/dataplane/gro.py): writes
# may then be TCP super packets. The flag is per device (the last queue attached sets
# it), so every queue of a fabric TUN is opened with it.
IFF_VNET_HDR = 0x4000
FLAGS = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR
DEFAULT_MTU = 1420
# TUNSETOFFLOAD (include/uapi/linux/if_tun.h): what the edge can take from the kernel:
# partial checksums, TCP super packets (TSO, with ECN) and UDP ones (USO, Linux 6.2+),
# cut by fabric/dataplane/segment.py. The features are the device's (every queue asks
# the same). FABRIC_NO_TSO=1 asks for none: one packet per read, checksums done.
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
OFFLOADS = (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)  # the second: kernels before USO
TUN_DEVICE = "/dev/net/tun"


class TunError(RuntimeError):
    pass


def _ifreq(name: str, flags: int) -> bytes:
    raw = name.encode()
    if not raw or len(raw) > 15:
        raise TunError(f"interface name {name!r} must be 1 to 15 characters")
    return struct.pack("16sH22x", raw, flags)


def open_queue(name: str) -> int:
    """Attach one new queue of multiqueue TUN `name` (creating the device if absent).

    Returns a non-blocking fd; closing it detaches the queue.
    """
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TunError("/dev/net/tun is missing: load the tun module (modprobe tun)") from exc
    except PermissionError as exc:
        raise TunError("cannot open /dev/net/tun: run as root or with CAP_NET_ADMIN") from exc
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, FLAGS))
    except OSError as exc:
        os.close(fd)
        raise TunError(
            f"cannot attach a queue of TUN {name!r}: {exc.strerror} "
            "(is it an existing single-queue device, or do you lack CAP_NET_ADMIN?)"
        ) from exc
    return fd


def enable_offload(fd: int) -> int:
    """Ask the kernel for segmentation offloads on the TUN (see OFFLOADS); the flags
    it took, 0 if none (then every read is one packet with its checksums done)."""
    if os.environ.get("FABRIC_NO_TSO") == "1":
        return 0
    for flags in OFFLOADS:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError:
            continue
    return 0


def create(name: str, addresses: list[str] | None = None, mtu: int = DEFAULT_MTU) -> None:
    """Create persistent multiqueue TUN `name`, give it `addresses` (CIDR) and bring it up."""
    fd = open_queue(name)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)
    configure(name, addresses, mtu)


def configure(name: str, addresses: list[str] | None, mtu: int = DEFAULT_MTU) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=name)
        if not links:
            raise TunError(f"TUN {name!r} does not exist")
        idx = links[0]
        ipr.link("set", index=idx, mtu=mtu)
        ipr.link("set", index=idx, state="up")
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
        for address in addresses or []:
            iface = ipaddress.ip_interface(address)
            if (str(iface.ip), iface.network.prefixlen) not in have:
                try:
                    ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
                except Exception as exc:  # another edge added it first
                    if "exists" not in str(exc).lower():
                        raise


def delete(name: str) -> bool:
    """Remove TUN `name`; False if it did not exist."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=name)
        if not links:
            return False
        # a persistent TUN goes away once persist is cleared and its queues are closed
        try:
            fd = open_queue(name)
            fcntl.ioctl(fd, TUNSETPERSIST, 0)
            os.close(fd)
        except (TunError, OSError):
            pass
        if ipr.link_lookup(ifname=name):
            ipr.link("del", index=links[0])
        return True
