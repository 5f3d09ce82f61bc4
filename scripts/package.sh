#!/usr/bin/env bash
# Builds the Debian package dist/detour_<version>_<arch>.deb with dpkg-deb: detourd
# (/usr/sbin) and detourctl (/usr/bin), the systemd units, /etc/detour with an example
# configuration, man pages generated from the CLI definitions (detourd(8), detourctl(8))
# and from docs/config.md (detour.toml(5)), completions for bash, zsh and fish, the docs,
# and maintainer scripts that never start the service before a configuration exists.
#
#   scripts/package.sh          build the package
#   scripts/package.sh --test   build it, install it on this machine (dpkg -i), run
#                               detourd --version and detourctl --help, purge it, and check
#                               that none of its files is left (root)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
DEB="$ROOT/dist/detour_${VERSION}_${ARCH}.deb"

build() {
  echo "== building detourd and detourctl (release)" >&2
  cargo build --release --quiet --bins
  local stage
  stage=$(mktemp -d /tmp/detour-package.XXXXXX)
  trap 'rm -rf "$stage"' RETURN
  echo "== man pages and completions (examples/gen-docs.rs)" >&2
  cargo run --quiet --example gen-docs -- "$stage/gen" >/dev/null
  local P="$stage/pkg"
  install -D -m 0755 -s target/release/detourd "$P/usr/sbin/detourd"
  install -D -m 0755 -s target/release/detourctl "$P/usr/bin/detourctl"
  for unit in systemd/*.service; do
    install -D -m 0644 "$unit" "$P/lib/systemd/system/$(basename "$unit")"
    sed -i -e 's|/usr/local/bin/detourd|/usr/sbin/detourd|g' \
      -e 's|^Documentation=.*|Documentation=man:detourd(8) man:detour.toml(5) file:/usr/share/doc/detour/README.md|' \
      "$P/lib/systemd/system/$(basename "$unit")"
  done
  install -d -m 0700 "$P/etc/detour"
  install -m 0644 packaging/detour.toml.example "$P/etc/detour/detour.toml.example"
  for page in "$stage"/gen/man/*; do
    local sec=${page##*.}
    install -D -m 0644 "$page" "$P/usr/share/man/man$sec/$(basename "$page")"
    gzip -9n "$P/usr/share/man/man$sec/$(basename "$page")"
  done
  install -D -m 0644 -t "$P/usr/share/bash-completion/completions" "$stage"/gen/completions/bash/*
  install -D -m 0644 -t "$P/usr/share/zsh/vendor-completions" "$stage"/gen/completions/zsh/*
  install -D -m 0644 -t "$P/usr/share/fish/vendor_completions.d" "$stage"/gen/completions/fish/*
  install -D -m 0644 -t "$P/usr/share/doc/detour" README.md docs/*.md
  cat >"$P/usr/share/doc/detour/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: detour
License: MIT OR Apache-2.0
COPYRIGHT
  install -d "$P/DEBIAN"
  install -m 0755 packaging/postinst packaging/prerm packaging/postrm "$P/DEBIAN/"
  echo "/etc/detour/detour.toml.example" >"$P/DEBIAN/conffiles"
  local size
  size=$(du -sk --exclude=DEBIAN "$P" | cut -f1)
  cat >"$P/DEBIAN/control" <<CONTROL
Package: detour
Version: $VERSION
Architecture: $ARCH
Maintainer: detour developers <detour@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.34), iproute2
Recommends: iptables, nftables
Section: net
Priority: optional
Description: resilient overlay for Linux routers and servers
 detourd forms an encrypted overlay with its peers: per-peer and aggregate TUN
 interfaces, failover of plain underlay traffic through one-hop relays in about
 100 ms, REPLEX multipath, relay policies and exits, and a management overlay
 with acknowledged messages to any node. detourctl shows peers, paths and
 routes, explains a route (why), pings through the overlay and reloads the
 configuration.
CONTROL
  mkdir -p dist
  dpkg-deb --root-owner-group -Zxz --build "$P" "$DEB" >/dev/null
  echo "$DEB"
}

test_package() {
  [ "$(id -u)" = 0 ] || { echo "--test needs root" >&2; exit 1; }
  if dpkg -s detour >/dev/null 2>&1; then
    echo "detour is already installed here; not touching it" >&2
    exit 1
  fi
  local files
  files=$(dpkg-deb -c "$DEB" | awk '{print $6}' | sed 's|^\./|/|' | grep -v '/$')
  echo "== installing $DEB" >&2
  dpkg -i "$DEB" >/dev/null
  trap 'dpkg --purge detour >/dev/null 2>&1 || true' EXIT
  /usr/sbin/detourd --version
  /usr/bin/detourctl --help | head -3
  for f in /usr/share/man/man8/detourd.8.gz /usr/share/man/man8/detourctl.8.gz /usr/share/man/man5/detour.toml.5.gz \
    /usr/share/bash-completion/completions/detourctl /usr/share/zsh/vendor-completions/_detourctl \
    /usr/share/fish/vendor_completions.d/detourctl.fish /lib/systemd/system/detourd.service /etc/detour/detour.toml.example; do
    [ -s "$f" ] || { echo "missing after install: $f" >&2; exit 1; }
  done
  zcat /usr/share/man/man5/detour.toml.5.gz | grep -q '^.SH NAME' || { echo "detour.toml.5 is not a man page" >&2; exit 1; }
  echo "== purging" >&2
  dpkg --purge detour >/dev/null
  trap - EXIT
  local left=0
  for f in $files /etc/detour; do
    if [ -e "$f" ]; then echo "left after purge: $f" >&2; left=1; fi
  done
  [ $left = 0 ] || exit 1
  echo "package test: installed, ran, purged, nothing left ($(echo "$files" | wc -l) files)"
}

build
if [ "${1:-}" = "--test" ]; then
  test_package
fi
