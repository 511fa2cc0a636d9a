"""Client commands that talk to a running fabric: `fabric admin ...`, `fabric peer ...`."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

import zmq

from fabric.control.reqclient import ReqClient, RequestTimeout
from fabric.ops.paths import StateDir


class AdminError(RuntimeError):
    pass


DEFAULT_TIMEOUT = 5.0
START_HINT = "start it with `fabric up --state-dir DIR` (or `fabric broker`), or point --state-dir at the running fabric"


class Unreachable(AdminError):
    """No broker answers at the admin endpoint (`fabric status` exits 2 for it)."""


def endpoint_for(state_dir: str | None, admin: str | None) -> str:
    if admin:
        return admin
    sd = StateDir.at(state_dir)
    sock = sd.run / "admin.sock"
    try:
        present = sock.exists()
    except PermissionError:
        raise AdminError(f"cannot read {sd.run}: permission denied; run as root (sudo), "
                         "or as the user that owns the state dir") from None
    if not present:
        raise Unreachable(f"no fabric is running on state dir {sd.root} ({sock} is missing): {START_HINT}")
    return sd.admin


def _probe_ipc(endpoint: str) -> None:
    """Fail at once when nothing listens on an ipc endpoint (a broker that died leaves
    its socket file behind; ZeroMQ would wait for the whole timeout)."""
    path = endpoint.removeprefix("ipc://")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
    except PermissionError:
        raise AdminError(f"cannot connect to {path}: permission denied; run as root (sudo), "
                         "or as the user that owns the state dir") from None
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            raise Unreachable(f"no broker is listening on {path} (it is not running): {START_HINT}") from None
        # anything else (e.g. a full backlog): let ZeroMQ try within the timeout
    finally:
        s.close()


def request(endpoint: str, req: dict[str, Any], timeout: float = DEFAULT_TIMEOUT,
            curve: dict[int, Any] | None = None) -> dict[str, Any]:
    if endpoint.startswith("ipc://"):
        _probe_ipc(endpoint)
    ctx: zmq.Context = zmq.Context.instance()
    client = ReqClient(ctx, endpoint, curve=curve)
    try:
        reply = client.call(req, timeout)
    except RequestTimeout:
        hint = ("is its broker running, and is your --key authorized (`fabric keys client`)?"
                if endpoint.startswith("tcp://") else f"is its broker stuck? {START_HINT}")
        raise Unreachable(f"the fabric at {endpoint} did not answer within {timeout:g}s: {hint}") from None
    finally:
        client.close()
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error") or reply.get("reason") or "request refused"))
    return reply


def check_peer(peers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The row of peer `name` in an admin `peers` reply; an unknown name is an error."""
    for p in peers:
        if p.get("name") == name:
            return p
    raise AdminError(f"no peer named {name!r}; `fabric admin peers` lists them")


def client_config(reply: dict[str, Any], endpoint: str) -> str:
    """The client configuration for the peer that `peer_add` created, as its protocol
    writes it (WireGuard: a wg-quick file)."""
    from fabric.protocols import registry

    proto = registry().get(str(reply.get("protocol", "wireguard")))
    if proto is None:
        raise AdminError(f"the broker made a peer of protocol {reply.get('protocol')!r}, which this fabric "
                         "command does not know: update fabric")
    return proto.client_profile(reply, endpoint)


def client_endpoint(reply: dict[str, Any], protocol: str, given: str | None = None) -> str:
    """HOST:PORT for the client config of the peer `peer_add` made: `given` (--endpoint);
    else the fabric's endpoint (`[server] endpoint`, whose port is WireGuard's: another
    protocol keeps its host and takes the reply's listen_port, that protocol's port);
    else this host's address and the reply's port."""
    if given:
        return given
    port = int(reply["listen_port"])
    configured = reply.get("endpoint")
    if configured:
        if protocol == "wireguard":
            return str(configured)
        host, _, _ = str(configured).rpartition(":")
        return f"{host}:{port}"
    return default_endpoint(port)


def default_endpoint(listen_port: int) -> str:
    """This host's first global address: good enough on a LAN; pass --endpoint otherwise."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for a in ipr.get_addr(family=2):
                if a["scope"] == 0:
                    ip = a.get_attr("IFA_ADDRESS")
                    if ip and not ip.startswith("127."):
                        return f"{ip}:{listen_port}"
    except Exception:
        pass
    return f"127.0.0.1:{listen_port}"


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def write_private(path: str, text: str) -> None:
    p = Path(path)
    p.write_text(text)
    p.chmod(0o600)
