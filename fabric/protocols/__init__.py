"""Wire protocols, one package each, behind fabric.protocols.base.

`registry()` gives a fresh instance of every protocol fabric speaks, by name; a
protocol's `number` names it in frames between edges and workers.
"""

from __future__ import annotations

from fabric.protocols.base import Protocol


def registry() -> dict[str, Protocol]:
    """Every protocol fabric speaks, by name."""
    from fabric.protocols.openvpn import OpenVPN
    from fabric.protocols.wireguard import WireGuard

    protos: list[Protocol] = [WireGuard(), OpenVPN()]
    return {p.name: p for p in protos}
