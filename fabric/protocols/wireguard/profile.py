"""The wg-quick configuration a stock WireGuard client takes (wireguard-tools wg-quick(8))."""

from __future__ import annotations

from typing import Any


def wg_quick(reply: dict[str, Any], endpoint: str) -> str:
    """A wg-quick configuration for the peer that `peer_add` created."""
    private = reply.get("private_key") or "<the private key matching the public key you gave>"
    lines = [
        f"# fabric peer {reply['name']}",
        "[Interface]",
        f"PrivateKey = {private}",
        f"Address = {', '.join(reply['allowed_ips'])}",
        "",
        "[Peer]",
        f"PublicKey = {reply['server_public_key']}",
    ]
    if reply.get("preshared_key"):
        lines.append(f"PresharedKey = {reply['preshared_key']}")
    lines += [
        f"Endpoint = {endpoint}",
        f"AllowedIPs = {', '.join(reply['networks'])}",
        "PersistentKeepalive = 25",
    ]
    return "\n".join(lines) + "\n"
