"""The layout keeps its promises (docs/architecture.md, "Map"; fabric/protocols/base.py, rules).

* a protocol package imports nothing from the processes, the control plane's sockets
  or the operator commands;
* the edge, the engine and the worker name no WireGuard message type and import
  nothing of WireGuard: they know protocols only through fabric.protocols.base;
* the control plane and the data plane's libraries import no protocol package;
* a plain (not editable) install carries every subpackage, and the native
  extensions (fabric/dataplane/_native.c, _offload.c) where this environment could build them.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fabric.dataplane import aead, segment

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ROOT / "fabric" / "protocols"
# what a protocol package may import from fabric (rule 1 of fabric/protocols/base.py)
PROTOCOL_MAY_IMPORT = ("fabric.protocols", "fabric.control.records", "fabric.dataplane.aead",
                       "fabric.dataplane.ippacket", "fabric.dataplane.replay", "fabric.dataplane.ratelimit",
                       "fabric.dataplane.sockfilter")
NEUTRAL_LOOPS = ("fabric/dataplane/edge.py", "fabric/dataplane/engine.py", "workers/worker.py", "brokers/broker.py")


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names), at any depth of the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def internal(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in ("fabric", "brokers", "workers")}


@pytest.mark.parametrize("path", sorted(PROTOCOLS.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_protocol_packages_import_only_what_the_rules_allow(path: Path) -> None:
    bad = {n for n in internal(imports(path))
           if not any(n == m or n.startswith(m + ".") for m in PROTOCOL_MAY_IMPORT)
           and n != "fabric"}
    # `from fabric.dataplane import ippacket` names the package: judge the module it takes
    bad = {n for n in bad if not any(n == f"fabric.dataplane.{m.rsplit('.', 1)[1]}" or n == "fabric.dataplane"
                                     for m in PROTOCOL_MAY_IMPORT if m.startswith("fabric.dataplane."))}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("rel", NEUTRAL_LOOPS)
def test_the_processes_know_no_wireguard(rel: str) -> None:
    path = ROOT / rel
    text = path.read_text()
    names = re.findall(r"\bMSG_(?:TRANSPORT|INITIATION|RESPONSE|COOKIE_REPLY)\b", text)
    assert not names, f"{rel} names WireGuard message types: {sorted(set(names))}"
    wg = {n for n in imports(path) if n.startswith("fabric.protocols.wireguard")}
    allowed = {"fabric.protocols.wireguard.crypto", "fabric.protocols.wireguard.crypto.key_to_base64"}
    assert wg <= allowed, f"{rel} imports {sorted(wg - allowed)}"  # base64 of peer keys in admin replies


@pytest.mark.parametrize("pkg", ["control", "dataplane"])
def test_neutral_libraries_import_no_protocol(pkg: str) -> None:
    for path in sorted((ROOT / "fabric" / pkg).rglob("*.py")):
        if path.name in ("edge.py", "engine.py"):
            continue  # the processes' own modules reach protocols through fabric.protocols
        bad = {n for n in imports(path) if n.startswith("fabric.protocols")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_a_plain_install_carries_every_subpackage(tmp_path: Path) -> None:
    cp = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {str(p.relative_to(ROOT)) for d in ("fabric", "brokers", "workers") for p in (ROOT / d).rglob("*.py")}
    assert want <= names, f"not in the wheel: {sorted(want - names)}"
    built = {"_native": aead.NativeBatchAead is not None, "_offload": segment.split_native is not None}
    for name, here in built.items():
        if here or os.environ.get("FABRIC_REQUIRE_NATIVE") == "1":
            # setup.py's optional extensions: built here, so they must be in the wheel too
            assert any(re.fullmatch(rf"fabric/dataplane/{name}\..*\.so", n) for n in names), sorted(names)
