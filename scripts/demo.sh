#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run `fabric demo`: fabric up + a wireguard-go
# client in throwaway network namespaces, ping, iperf3, admin sessions.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/fabric" demo "$@"
