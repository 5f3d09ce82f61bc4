#!/usr/bin/env bash
# The test command: installs what is missing, then runs the unit and property tests and
# the end-to-end tests in network namespaces (netns-tests/). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_root
install_deps

# Namespaces left by an interrupted earlier run of the netns tests.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^dtt' || true); do
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
done

echo "== code checks: format, lints, documentation links"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  command -v rustup >/dev/null && rustup component add rustfmt clippy
fi
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings -D rustdoc::broken_intra_doc_links" cargo doc --workspace --no-deps --quiet

echo "== unit and property tests"
# The core crate (detour-core, no I/O crates) and the shell.
cargo test --workspace --lib --bins
cargo test --workspace --doc
# The management overlay simulation of the scale benchmark, at 200 nodes.
cargo test --example scale_sim
echo "== fuzz smoke: every parser target for 20 s (scripts/fuzz.sh)"
scripts/fuzz.sh
echo "== end-to-end tests in network namespaces"
# The flood generator the flood test runs (examples/flood.rs).
cargo build --quiet --example flood
# One at a time: several overlays on two cores at once would make timings meaningless.
cargo test --test netns -- --test-threads=1
echo "== chaos soak, 2 minutes (scripts/soak.sh; the debug build)"
DETOUR_NO_BUILD=1 BIN="$PWD/target/debug" scripts/soak.sh 2
echo "== Debian package: build, install on this machine, run, purge (scripts/package.sh --test)"
scripts/package.sh --test
echo "== the unit under a real systemd 252 in a container (scripts/systemd-test.sh)"
scripts/systemd-test.sh
