#!/usr/bin/env bash
# Install what fabric's demo and tests need, on Debian 12, as root. Idempotent.
#   - apt packages: wireguard-go wireguard-tools iperf3 iputils-ping tcpdump iproute2 openvpn (bench anchor) python3-venv
#     docker-compose (validates compose.yaml; Docker itself is not needed)
#     zbar-tools (decodes the QR code `fabric peer add --qr` prints, in a test)
#     gcc libc6-dev python3-dev libssl-dev (build the native batch AEAD, fabric/dataplane/_native.c;
#     without them pip still installs fabric and the data path uses its pure-Python AEAD)
#   - .venv in the repository root with fabric installed editable, plus test tools
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (e.g. sudo $0): it installs apt packages and the tests create network namespaces" >&2
    exit 1
fi

PKGS=(wireguard-go wireguard-tools iperf3 iputils-ping tcpdump iproute2 openvpn openssl util-linux python3 python3-venv ca-certificates docker-compose zbar-tools curl
      gcc libc6-dev python3-dev libssl-dev)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "setup.sh: apt packages already installed"
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup.sh: creating .venv"
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
echo "setup.sh: ready ($(.venv/bin/python --version), fabric installed in .venv)"
