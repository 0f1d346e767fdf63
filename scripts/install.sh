#!/bin/sh
# Install skyferry as a systemd service (what `make install` runs):
#   a virtualenv under $PREFIX (/opt/skyferry) with skyferry and its dependencies,
#   the unit (/etc/systemd/system/skyferry.service), its user (sysusers.d), and
#   /etc/skyferry/skyferry.toml (the documented example; an existing one is kept).
# Then: put keys under /etc/skyferry/keys (private keys 0600, owned by skyferry), edit the
#       config, `skyferry check-config` (as the user skyferry),
#       `systemctl enable --now skyferry`.
#
# Variables: PYTHON (python3), PREFIX, PACKAGE, DESTDIR (stage into a folder instead of /: no user is
# created and nothing is started; the venv is then only valid under DESTDIR), PIP_ARGS.
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
PREFIX=${PREFIX:-/opt/skyferry}
DESTDIR=${DESTDIR:-}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SYSUSERSDIR=${SYSUSERSDIR:-/usr/lib/sysusers.d}
CONFDIR=${CONFDIR:-/etc/skyferry}
PIP_ARGS=${PIP_ARGS:-}
PACKAGE=${PACKAGE:-$SRC}  # what pip installs: this source tree, or a wheel built from it

venv="$DESTDIR$PREFIX/venv"
echo "skyferry: installing into $venv"
"$PYTHON" -m venv "$venv"
# shellcheck disable=SC2086 # PIP_ARGS is a list of options
"$venv/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS "$PACKAGE"

install -D -m 0644 "$SRC/systemd/skyferry.service" "$DESTDIR$UNITDIR/skyferry.service"
# The cloud side's service (`skyferry land`), not enabled: it runs where the recipient key is.
install -D -m 0644 "$SRC/systemd/skyferry-land.service" "$DESTDIR$UNITDIR/skyferry-land.service"
install -D -m 0644 "$SRC/systemd/skyferry.sysusers" "$DESTDIR$SYSUSERSDIR/skyferry.conf"
install -D -m 0644 "$SRC/README.md" "$DESTDIR$PREFIX/share/doc/README.md"
install -d -m 0750 "$DESTDIR$CONFDIR"
if [ -e "$DESTDIR$CONFDIR/skyferry.toml" ]; then
    install -m 0640 "$SRC/config/skyferry.toml" "$DESTDIR$CONFDIR/skyferry.toml.example"
    echo "skyferry: kept $CONFDIR/skyferry.toml; the new example is skyferry.toml.example"
else
    install -m 0640 "$SRC/config/skyferry.toml" "$DESTDIR$CONFDIR/skyferry.toml"
fi
install -m 0640 "$SRC/config/land.toml" "$DESTDIR$CONFDIR/land.toml.example"

if [ -n "$DESTDIR" ]; then
    echo "skyferry: staged under $DESTDIR"
    exit 0
fi
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers "$SYSUSERSDIR/skyferry.conf"
elif ! id skyferry >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/skyferry --shell /usr/sbin/nologin skyferry
fi
chgrp -R skyferry "$CONFDIR"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
# Private keys are 0600 and owned by the service user, never group-readable: the group
# skyferry also holds the producers allowed to use the put socket. skyferry refuses any other
# mode (agent/format/crypto.py), and `check-config` says so by key path.
cat <<MSG
skyferry: installed. Next:
  skyferry keygen --out /root/skyferry-keys --site SITE   # on a trusted machine
  cd /root/skyferry-keys   # then copy the edge keys (private ones 0600, owned by skyferry):
  install -d -m 0750 -o root -g skyferry $CONFDIR/keys
  install -m 0600 -o skyferry -g skyferry edge/site.key edge/dedup.key $CONFDIR/keys/
  install -m 0644 -o root -g root edge/recipient.pub $CONFDIR/keys/
  edit $CONFDIR/skyferry.toml, then check it as the service user:
  runuser -u skyferry -- $PREFIX/venv/bin/skyferry check-config $CONFDIR/skyferry.toml
  systemctl enable --now skyferry;  journalctl -u skyferry -f
MSG
