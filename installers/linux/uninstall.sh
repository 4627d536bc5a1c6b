#!/bin/sh
# Remove everything installers/linux/install.sh added: the service, /opt/hatchway-agent and its link, the
# config (with the node credential), the state directory with the copied models, and the `hatchway` user.
# The node stays listed on the plane until an admin revokes it (`hatchway admin nodes revoke NODE`).
#
#   sudo sh uninstall.sh [--keep-config] [--root DIR]
#
# --keep-config keeps /etc/hatchway (so a reinstall keeps the node's identity without a new token).
# Running it again, or on a system where the agent was never installed, changes nothing and succeeds.
set -eu

SERVICE_USER=hatchway
PREFIX=/opt/hatchway-agent
LINK=/usr/local/bin/hatchway-agent
UNIT=/etc/systemd/system/hatchway-agent.service
CONFIG_DIR=/etc/hatchway
STATE_DIR=/var/lib/hatchway-agent

die() {
    echo "uninstall.sh: $*" >&2
    exit 1
}

KEEP_CONFIG=
ROOT=
while [ $# -gt 0 ]; do
    case $1 in
        --keep-config) KEEP_CONFIG=1; shift ;;
        --root) [ $# -ge 2 ] || die "--root needs a value"; ROOT=$2; shift 2 ;;
        -h | --help) echo "Usage: sudo sh uninstall.sh [--keep-config] [--root DIR]"; exit 0 ;;
        *) die "unknown option: $1" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root: sudo sh $0"
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || die "--root $ROOT is not a directory"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=
fi
offline_root=$ROOT
if [ -z "$ROOT" ] && [ ! -d /run/systemd/system ]; then
    offline_root=/
fi

# The service first: stopped (it drains) and unregistered, by the agent that registered it when it is there.
if [ -x "$ROOT$PREFIX/hatchway-agent" ]; then
    "$ROOT$PREFIX/hatchway-agent" service uninstall ${offline_root:+--root "$offline_root"}
elif [ -e "$ROOT$UNIT" ]; then
    if [ -n "$offline_root" ]; then
        systemctl --root "$offline_root" disable hatchway-agent.service || true
    else
        systemctl disable --now hatchway-agent.service || true
    fi
    rm -f "$ROOT$UNIT"
    [ -n "$offline_root" ] || systemctl daemon-reload
fi

if [ -L "$ROOT$LINK" ]; then
    rm -f "$ROOT$LINK"
fi
rm -rf "$ROOT$PREFIX" "$ROOT$PREFIX.new" "$ROOT$PREFIX.old" "$ROOT$STATE_DIR"
[ -n "$KEEP_CONFIG" ] || rm -rf "$ROOT$CONFIG_DIR"

if grep -q "^$SERVICE_USER:" "$ROOT/etc/passwd"; then
    userdel ${ROOT:+--prefix "$ROOT"} "$SERVICE_USER"
fi
# userdel removes the user's own group only where login.defs says USERGROUPS_ENAB yes.
if grep -q "^$SERVICE_USER:" "$ROOT/etc/group"; then
    groupdel ${ROOT:+--prefix "$ROOT"} "$SERVICE_USER"
fi
echo "hatchway-agent is removed."
