"""Admin output and admin errors: tables from fixed replies, QR codes, and a live broker's
answers to bad requests (unknown peers, duplicate names, overlapping allowed IPs, no broker).

The live cases run a real `fabric broker` on ipc sockets in a temporary state dir
(no network namespace needed) and the CLI as a user runs it, in subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokers.reports import Reports
from fabric.ops import render

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0

PEERS = [
    {"name": "alice", "public_key": "A" * 43 + "=", "allowed_ips": ["198.19.100.2/32"],
     "endpoint": "198.18.1.2:40000", "latest_handshake": NOW - 30, "rx_bytes": 2048, "tx_bytes": 100,
     "sessions": 1, "cipher": "CHACHA20-POLY1305"},
    {"name": "bob", "protocol": "toy", "public_key": "B" * 43 + "=", "allowed_ips": ["198.19.100.3/32", "fd00::3/128"],
     "endpoint": "", "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0, "sessions": 0},
]


# --- tables -----------------------------------------------------------------------------------

def test_peer_rows_from_a_fixed_reply() -> None:
    t = render.peers_table(PEERS, NOW)
    assert t.header[:5] == ["PEER", "PROTO", "ALLOWED IPS", "ENDPOINT", "HANDSHAKE"]
    assert t.rows[0] == ["alice", "wg", "198.19.100.2/32", "198.18.1.2:40000", "30s ago", "2.0 KiB",
                         "100 B", "1"]
    assert t.rows[1][:5] == ["bob", "toy", "198.19.100.3/32, fd00::3/128", "-", "never"]
    ovpn = {**PEERS[1], "protocol": "openvpn", "cipher": "AES-256-GCM"}
    assert render.peers_table([ovpn], NOW).rows[0][1] == "ovpn/aes256"  # the negotiated cipher


def test_tables_are_plain_and_whole_when_not_a_terminal() -> None:
    text = render.to_text([render.peers_table(PEERS, NOW)], width=80)
    assert "\x1b[" not in text  # no colour codes in a pipe
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["PEER", "PROTO", "ALLOWED", "IPS"]
    assert any(line.startswith("alice ") for line in lines) and any(line.startswith("bob ") for line in lines)
    assert all(line == line.rstrip() for line in lines)
    # nothing is cut off at 80 columns: long cells fold onto the next line
    assert lines[0].split()[-1] == "SESSIONS" and all(len(line) <= 80 for line in lines)
    assert "fd00::3/128" in text and "…" not in text


def test_empty_tables_say_what_to_do() -> None:
    assert render.to_text([render.peers_table([], NOW)]).strip() == "no peers; add one with `fabric peer add NAME`"
    assert render.to_text([render.sessions_table([], NOW)]).strip() == "no sessions"


def test_stats_rows_group_by_role_with_drops_last() -> None:
    counters = {"edge.udp_in": 10, "edge.drop_short": 2, "edge.tun_in": 5, "worker.decrypted": 10,
                "handshakes": 1, "worker.drop_decrypt": 1}
    tables = render.stats_tables(counters, {"broker.sessions": 1})
    names = [r[0] for r in tables[0].rows]
    assert names == ["handshakes", "edge.tun_in", "edge.udp_in", "edge.drop_short",
                     "worker.decrypted", "worker.drop_decrypt"]
    assert tables[1].rows == [["broker.sessions", "1"]]
    assert render.stats_tables({}, None)[0].rows == []


def test_durations_and_sizes() -> None:
    assert [render.duration(d) for d in (0, 59, 61, 3600 + 120, 86400 * 2 + 3600)] == \
        ["0s", "59s", "1m01s", "1h02m", "2d01h"]
    assert [render.size(n) for n in (0, 1023, 1024, 5 * 1024 * 1024)] == ["0 B", "1023 B", "1.0 KiB", "5.0 MiB"]


def test_broker_rates_are_counter_increase_per_second() -> None:
    r = Reports()
    key = ("edge", 0, 42)
    r.add({"role": "edge", "id": 0, "pid": 42, "counters": {"udp_in": 100}}, 10.0)
    assert r.rates(key) == {}  # one report: no rate yet
    r.add({"role": "edge", "id": 0, "pid": 42, "counters": {"udp_in": 300, "tun_in": 50}}, 12.0)
    assert r.rates(key) == {"udp_in": 100.0, "tun_in": 25.0}
    r.add({"role": "edge", "id": 0, "pid": 42, "counters": {"udp_in": 300, "tun_in": 50}}, 13.0)
    assert r.rates(key) == {"udp_in": 0.0, "tun_in": 0.0}


# --- QR codes -------------------------------------------------------------------------------

CONFIG = """[Interface]
PrivateKey = 8L3n2h8d8/6rPZx8XrEff4lbJFBud9cMw7CgbztgDm8=
Address = 198.19.100.2/32

[Peer]
PublicKey = CiVqfQRMX3kpC2mttvXP+wAIpTBz2PQNhbB52ztDKFs=
Endpoint = 198.18.0.1:51820
AllowedIPs = 198.19.100.0/24
PersistentKeepalive = 25
"""


def test_qr_matrix_is_qrcodes_own_for_the_config() -> None:
    import qrcode
    from qrcode.constants import ERROR_CORRECT_L

    ref = qrcode.QRCode(error_correction=ERROR_CORRECT_L, border=render.QR_BORDER)
    ref.add_data(CONFIG.encode())
    ref.make(fit=True)
    expected = [list(map(bool, row)) for row in ref.get_matrix()]
    assert render.qr_matrix(CONFIG) == expected
    assert render.qr_matrix(CONFIG + "x") != expected  # the content matters


def test_qr_text_has_the_expected_size_and_reads_back() -> None:
    m = render.qr_matrix(CONFIG)
    n = len(m)
    assert (n - 2 * render.QR_BORDER - 17) % 4 == 0 and n > 21  # version k has 17 + 4k modules
    assert n % 2 == 1  # so the last text line has a padding row of quiet zone
    text = render.qr_text(CONFIG)
    lines = text.splitlines()
    assert len(lines) == (n + 1) // 2 and all(len(line) == n for line in lines)
    assert set(text) <= set("█▀▄ \n")
    back = render.qr_from_text(text)
    assert back[:n] == m and back[n:] == [[False] * n]
    assert lines[0] == "█" * n  # the quiet zone is light


def _pbm(matrix: list[list[bool]], scale: int = 4) -> str:
    rows = [[c for c in r for _ in range(scale)] for r in matrix for _ in range(scale)]
    body = "\n".join(" ".join("1" if c else "0" for c in r) for r in rows)
    return f"P1\n{len(rows[0])} {len(rows)}\n{body}\n"


@pytest.mark.skipif(shutil.which("zbarimg") is None, reason="zbarimg not installed (apt-get install zbar-tools)")
def test_qr_printed_in_the_terminal_decodes_to_the_config(tmp_path: Path) -> None:
    # what a phone sees: the modules read back from the printed characters
    img = tmp_path / "qr.pbm"
    img.write_text(_pbm(render.qr_from_text(render.qr_text(CONFIG))))
    cp = subprocess.run(["zbarimg", "-q", "--raw", str(img)], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.rstrip("\n") == CONFIG.rstrip("\n")


# --- a live broker ----------------------------------------------------------------------------

def fabric(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "fabric", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(cp: subprocess.CompletedProcess[str], *words: str) -> str:
    assert cp.returncode != 0, cp.stdout
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    assert "Traceback" not in cp.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    sd = tmp_path_factory.mktemp("state")
    sd.chmod(0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRIC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    log = open(sd / "broker.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "fabric", "broker", "--state-dir", str(sd),
                             "--address", "198.19.100.1/24"], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while fabric("admin", "peers", "--json", "--state-dir", str(sd)).returncode != 0:
            assert proc.poll() is None, (sd / "broker.log").read_text()
            assert time.monotonic() < deadline, "broker did not answer"
            time.sleep(0.2)
        assert fabric("peer", "add", "alice", "--allowed-ip", "198.19.100.10/32", "--state-dir", str(sd)).returncode == 0
        yield sd
        assert proc.poll() is None, "the broker died: " + (sd / "broker.log").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def peer_names(sd: Path) -> list[str]:
    cp = fabric("admin", "peers", "--json", "--state-dir", str(sd))
    assert cp.returncode == 0, cp.stderr
    return sorted(p["name"] for p in json.loads(cp.stdout))


def test_peer_add_json_has_config_keys_addresses_and_qr(broker: Path) -> None:
    cp = fabric("peer", "add", "carol", "--json", "--qr", "--endpoint", "198.18.0.1:51820", "--state-dir", str(broker))
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert out["name"] == "carol" and out["private_key"] and out["public_key"]
    assert out["allowed_ips"] == ["198.19.100.2/32"]
    assert f"PrivateKey = {out['private_key']}" in out["config"]
    assert out["qr"] == render.qr_text(out["config"])
    try:
        text = fabric("peer", "add", "dave", "--qr", "--endpoint", "198.18.0.1:51820", "--state-dir", str(broker))
        assert text.returncode == 0, text.stderr
        assert "[Interface]" in text.stdout and "# fabric peer dave" in text.stdout
        qr_lines = [line for line in text.stdout.splitlines() if line and set(line) <= set("█▀▄ ")]
        n = len(qr_lines[0])
        assert len(qr_lines) == (n + 1) // 2 > 10
        cfg = text.stdout[: text.stdout.index("PersistentKeepalive = 25\n") + len("PersistentKeepalive = 25\n")]
        assert "\n".join(qr_lines) + "\n" == render.qr_text(cfg)
    finally:
        for name in ("carol", "dave"):
            fabric("peer", "remove", name, "--state-dir", str(broker))


def test_duplicate_name_is_refused_and_the_peer_kept(broker: Path) -> None:
    key_before = json.loads(fabric("admin", "peers", "alice", "--json", "--state-dir", str(broker)).stdout)[0]["public_key"]
    one_line_error(fabric("peer", "add", "alice", "--state-dir", str(broker)), "'alice'", "exists already")
    after = json.loads(fabric("admin", "peers", "alice", "--json", "--state-dir", str(broker)).stdout)
    assert [p["public_key"] for p in after] == [key_before]


def test_an_allowed_ip_of_another_peer_is_refused(broker: Path) -> None:
    try:
        one_line_error(fabric("peer", "add", "eve", "--allowed-ip", "198.19.100.10/32", "--state-dir", str(broker)),
                       "'alice'", "'eve'", "198.19.100.10/32")
        assert peer_names(broker) == ["alice"]
    finally:
        fabric("peer", "remove", "eve", "--state-dir", str(broker))


def test_overlapping_allowed_ips_are_refused(broker: Path) -> None:
    # a network that contains another peer's address (config.check_overlaps)
    try:
        one_line_error(fabric("peer", "add", "eve", "--allowed-ip", "198.19.100.0/28", "--state-dir", str(broker)),
                       "'alice'", "'eve'")
        assert peer_names(broker) == ["alice"]
    finally:
        fabric("peer", "remove", "eve", "--state-dir", str(broker))


def test_unknown_peers_name_the_peer_and_how_to_list(broker: Path) -> None:
    for args in (("peer", "remove", "nobody"), ("admin", "peers", "nobody"), ("admin", "sessions", "nobody"),
                 ("admin", "peers", "nobody", "--json")):
        one_line_error(fabric(*args, "--state-dir", str(broker)), "'nobody'", "fabric admin peers")
    assert peer_names(broker) == ["alice"]
    cp = fabric("admin", "sessions", "alice", "--json", "--state-dir", str(broker))
    assert cp.returncode == 0 and json.loads(cp.stdout) == []  # a known peer without sessions


def test_status_with_only_a_broker_is_degraded(broker: Path) -> None:
    cp = fabric("status", "--json", "--state-dir", str(broker))
    assert cp.returncode == 1, cp.stderr
    view = json.loads(cp.stdout)
    assert view["health"] == "degraded" and view["peer_count"] == 1
    assert any("no edge is up" in p for p in view["problems"])
    assert any("no worker is up" in p for p in view["problems"])
    assert view["broker"]["pid"] > 0 and view["broker"]["uptime"] >= 0
    text = fabric("status", "--state-dir", str(broker))
    assert text.returncode == 1
    assert text.stdout.splitlines()[-1].startswith("fabric degraded: no edge is up")


def test_admin_tables_and_stats_render(broker: Path) -> None:
    cp = fabric("admin", "peers", "--state-dir", str(broker))
    assert cp.returncode == 0 and "alice" in cp.stdout and "198.19.100.10/32" in cp.stdout
    assert "\x1b[" not in cp.stdout
    for what in ("stats", "status", "sessions"):
        cp = fabric("admin", what, "--state-dir", str(broker))
        assert cp.returncode == 0, (what, cp.stderr)
        assert json.loads(fabric("admin", what, "--json", "--state-dir", str(broker)).stdout) is not None


def test_keys_list_json(tmp_path: Path) -> None:
    cp = fabric("keys", "list", "--json", "--state-dir", str(tmp_path))
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == []


def test_no_broker_is_a_quick_one_line_error(tmp_path: Path) -> None:
    # a broker that died leaves its socket file: nothing listens on it any more
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run / "admin.sock"))
    s.close()
    t0 = time.monotonic()
    cp = fabric("status", "--state-dir", str(tmp_path))
    assert cp.returncode == 2
    one_line_error(cp, "no broker is listening", "fabric up")
    cp = fabric("admin", "peers", "--state-dir", str(tmp_path))
    assert cp.returncode == 1
    one_line_error(cp, "no broker is listening", "--state-dir")
    assert time.monotonic() - t0 < 15  # no 5 s timeouts: each process starts, probes and exits
    # no fabric at all on that state dir
    empty = tmp_path / "nothing"
    cp = fabric("status", "--json", "--state-dir", str(empty))
    assert cp.returncode == 2
    assert json.loads(cp.stdout)["health"] == "unreachable"
    one_line_error(cp, "no fabric is running", "fabric up")
    one_line_error(fabric("peer", "remove", "x", "--state-dir", str(empty)), "no fabric is running")


def test_a_broker_that_does_not_answer_times_out_within_the_bound(tmp_path: Path) -> None:
    # something listens but never answers (a hung broker): the --timeout bounds the wait
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run / "admin.sock"))
    s.listen(8)
    try:
        t0 = time.monotonic()
        cp = fabric("status", "--timeout", "1", "--state-dir", str(tmp_path))
        assert cp.returncode == 2
        one_line_error(cp, "did not answer within 1s")
        assert time.monotonic() - t0 < 15
    finally:
        s.close()
