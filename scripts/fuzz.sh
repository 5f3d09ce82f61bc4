#!/usr/bin/env bash
# Fuzzes the parsers that see bytes from outside (fuzz/fuzz_targets/) with cargo-fuzz
# (libFuzzer) on the stable toolchain: RUSTC_BOOTSTRAP=1 lets it pass its nightly flags,
# and -s none leaves out the address sanitizer (the targets are safe Rust; a panic is the
# finding). Installs cargo-fuzz when missing.
#
#   scripts/fuzz.sh                 every target for 20 s (what CI runs)
#   scripts/fuzz.sh TARGET [SECONDS]  one target (or `all`) for SECONDS (default 20)
#   scripts/fuzz.sh --seeds         writes the seeds detour's own encoders make (fuzz/seeds/)
#   scripts/fuzz.sh --capture       captures seeds from real packets in network namespaces
#                                   (the netns test seeds::, as root) into fuzz/seeds/*/real-*
#
# Corpora grow in fuzz/corpus/TARGET (seeds committed in fuzz/seeds/TARGET); a crash is
# written to fuzz/artifacts/TARGET and the script exits non-zero.
set -euo pipefail
if [ "${1:-}" = "--capture" ]; then
  cd "$(dirname "$0")/.."
  DETOUR_SEEDS_TO="$PWD/fuzz/seeds" exec cargo test --quiet --test netns seeds:: -- --nocapture
fi
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
# `seeds` is the program that writes fuzz/seeds/ (scripts/fuzz.sh --seeds), not a target.
if [ "${1:-}" = "--seeds" ]; then
  exec cargo run --release --quiet --bin seeds
fi
targets=$(cargo fuzz list | grep -vx seeds)
if [ $# -ge 1 ] && [ "$1" != all ]; then targets="$1"; fi
seconds="${2:-20}"
for t in $targets; do cargo fuzz build -s none "$t" >/dev/null; done
for t in $targets; do
  mkdir -p "corpus/$t"
  dirs=("corpus/$t")
  if [ -d "seeds/$t" ]; then dirs+=("seeds/$t"); fi
  echo "== fuzz $t for ${seconds} s"
  log=$(mktemp)
  if ! cargo fuzz run -s none "$t" "${dirs[@]}" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    rm -f "$log"
    echo "fuzz target $t failed: see fuzz/artifacts/$t" >&2
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)|^#[0-9]+[[:space:]]+DONE' "$log" || true
  rm -f "$log"
done
