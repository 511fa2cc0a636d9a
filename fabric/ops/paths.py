"""Where one fabric keeps its keys, state and sockets (see docs/architecture.md)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = "/var/lib/fabric"


def default_state_dir() -> str:
    return os.environ.get("FABRIC_STATE_DIR", DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class StateDir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str] | None) -> StateDir:
        return cls(Path(path or default_state_dir()).absolute())

    @property
    def run(self) -> Path:
        return self.root / "run"

    def ensure(self) -> StateDir:
        """Create the directory and its run/ socket directory, both 0700 (invariant 6)."""
        for d in (self.root, self.run):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        return self

    def ipc(self, name: str) -> str:
        endpoint = f"ipc://{self.run / name}.sock"
        if len(endpoint) - len("ipc://") > 107:
            raise ValueError(f"state dir path too long for an ipc socket: {self.run} (use a shorter --state-dir)")
        return endpoint

    # broker endpoints
    @property
    def broker_pub(self) -> str:
        return self.ipc("broker-pub")

    @property
    def broker_snapshot(self) -> str:
        return self.ipc("broker-snap")

    @property
    def broker_commit(self) -> str:
        return self.ipc("broker-commit")

    @property
    def broker_stats(self) -> str:
        return self.ipc("broker-stats")

    @property
    def admin(self) -> str:
        return self.ipc("admin")

    def edge_work(self, edge_id: int) -> str:
        return self.ipc(f"edge-{edge_id}-work")

    def edge_result(self, edge_id: int) -> str:
        return self.ipc(f"edge-{edge_id}-result")

    def edge_control(self, edge_id: int) -> str:
        """ROUTER: control datagrams for one worker in particular (a protocol's affinity)."""
        return self.ipc(f"edge-{edge_id}-control")

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def broker_state(self) -> Path:
        return self.root / "broker.state"

    @property
    def session_table(self) -> Path:
        """Host-shared session table: in /dev/shm, named after this state dir."""
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else self.run
        return base / f"fabric-{digest}"

    def lock(self, name: str) -> int:
        """Hold an exclusive lock file run/<name>.lock for this process's lifetime.

        A second bind on an ipc path silently takes it over, so a second broker or a
        second edge with the same id must refuse to start instead.
        """
        path = self.run / f"{name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise RuntimeError(
                    f"another {name} is already running on {self.root} (lock {path})"
                ) from exc
            raise
        os.set_inheritable(fd, False)
        return fd
