#!/usr/bin/env bash
# Chaos soak (a benchmark, not a test; issue 13): 8 detourd in network namespaces, full
# mesh; random silent and one-way cuts, 5-30 % loss, relays killed with SIGKILL and
# restarted, relays stopped and started (directory churn), on a schedule drawn from
# SOAK_SEED (default 1); meanwhile three long TCP streams whose every byte is checked,
# acknowledged management messages between random pairs, and status scrapes every 5 s.
# Prints one JSON line (scripts/soak.py lists the keys) and exits non-zero when a message
# was lost, a stream reset or corrupted, a daemon panicked or left kernel objects, or an
# endpoint's RSS grew past the stated bound.
#
#   scripts/soak.sh [MINUTES]     default 10; the test suite runs 2
#
# Run as root.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
MINUTES=${1:-10}
lab_begin soak
mesh_start n1 n2 n3 n4 n5 n6 n7 n8
echo "== soak: $MINUTES minutes, seed ${SOAK_SEED:-1}" >&2
python3 "$DETOUR_ROOT/scripts/soak.py" "$P" "$DIR" "$BIN" $((MINUTES * 60)) "${SOAK_SEED:-1}"
