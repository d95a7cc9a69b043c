#!/usr/bin/env bash
# Install xlb on this host: lbd, lbctl and xlb-decap in $PREFIX/bin, the systemd unit,
# /etc/xlb/lbd.env (kept if it exists) and the docs. Run as root from a checkout:
#
#   deploy/install.sh              build (release) and install under /usr/local
#   DESTDIR=/tmp/pkg deploy/install.sh   stage into DESTDIR (packaging; nothing started)
#
# Then: edit /etc/xlb/lbd.env (LBD_ARGS="--iface eth0 ..."), `systemctl enable --now
# xlb-lbd`, and `lbctl service add ...` or `lbctl apply -f FILE`; lbd keeps the
# services in /var/lib/xlb/state.yaml across restarts (docs/operations.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
if [[ -z ${SKIP_BUILD:-} ]]; then
  deploy/install-deps.sh
  cargo build --release --locked -p xdp -p lbd -p control
fi
install -d "$DESTDIR$PREFIX/bin" "$DESTDIR/etc/systemd/system" "$DESTDIR/etc/xlb" \
  "$DESTDIR$PREFIX/share/doc/xlb"
BIN_DIR=${BIN_DIR:-target/release}
install -m 0755 "$BIN_DIR/lbd" "$BIN_DIR/lbctl" "$BIN_DIR/xlb-decap" "$DESTDIR$PREFIX/bin/"
sed "s|/usr/local/|$PREFIX/|g" deploy/systemd/xlb-lbd.service > "$DESTDIR/etc/systemd/system/xlb-lbd.service"
chmod 0644 "$DESTDIR/etc/systemd/system/xlb-lbd.service"
if [[ ! -e $DESTDIR/etc/xlb/lbd.env ]]; then
  cat > "$DESTDIR/etc/xlb/lbd.env" <<'ENV'
# lbd's command-line settings (lbd --help): the interfaces it serves at least. Or leave
# this empty and put them in /etc/xlb/lbd.toml (docs/operations.md, Starting lbd).
LBD_ARGS="--iface eth0"
ENV
fi
install -m 0644 docs/operations.md docs/protocol.md README.md "$DESTDIR$PREFIX/share/doc/xlb/"
if [[ -z $DESTDIR ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
fi
echo "installed under ${DESTDIR:-/}: edit /etc/xlb/lbd.env, then systemctl enable --now xlb-lbd"
