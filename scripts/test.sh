#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole suite: pytest (unit, vectors,
# fuzz, network-namespace end-to-end; the data path's unit tests once more on the
# pure-Python path), ruff, mypy and docker-compose's check of compose.yaml. Exits non-zero if any fails.
# Extra arguments go to pytest, e.g. scripts/test.sh -k e2e -x
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/setup.sh" || exit 1

failed=()
# the native data path (fabric/dataplane/_native.c, _offload.c) must have been built: no silent fallback
export FABRIC_REQUIRE_NATIVE=1
echo "== pytest"
.venv/bin/python -m pytest -q "$@" || failed+=(pytest)
echo "== pytest, the pure-Python data path (FABRIC_NATIVE=0): AEAD, segmentation, coalescing, data path and in-memory node tests"
FABRIC_NATIVE=0 .venv/bin/python -m pytest -q -m "not netns" tests/test_aead.py tests/test_segment.py tests/test_gro.py \
    tests/test_datapath.py tests/test_openvpn_datapath.py tests/test_node.py tests/test_openvpn_node.py \
    || failed+=(pytest-pure)
echo "== ruff check ."
.venv/bin/ruff check . || failed+=(ruff)
echo "== mypy fabric brokers workers"
.venv/bin/mypy fabric brokers workers || failed+=(mypy)
echo "== docker-compose -f compose.yaml config -q"
docker-compose -f compose.yaml config -q || failed+=(docker-compose)

if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all checks passed"
