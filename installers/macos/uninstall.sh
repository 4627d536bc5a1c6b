#!/bin/sh
# Remove everything installers/macos/install.sh added: the launchd daemon, /usr/local/hatchway-agent and its
# link, the data folder (config with the node credential, copied models), the logs, and the `_hatchway` user.
# The node stays listed on the plane until an admin revokes it (`hatchway admin nodes revoke NODE`).
#
#   sudo sh uninstall.sh [--keep-config]
#
# --keep-config keeps the config (so a reinstall keeps the node's identity without a new token).
# Running it again, or where the agent was never installed, changes nothing and succeeds.
set -eu

SERVICE_USER=_hatchway
PREFIX=/usr/local/hatchway-agent
LINK=/usr/local/bin/hatchway-agent
PLIST=/Library/LaunchDaemons/com.hatchway.agent.plist
DATA_DIR="/Library/Application Support/Hatchway"
LOG_DIR=/Library/Logs/Hatchway

die() {
    echo "uninstall.sh: $*" >&2
    exit 1
}

KEEP_CONFIG=
while [ $# -gt 0 ]; do
    case $1 in
        --keep-config) KEEP_CONFIG=1; shift ;;
        -h | --help) echo "Usage: sudo sh uninstall.sh [--keep-config]"; exit 0 ;;
        *) die "unknown option: $1" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root: sudo sh $0"
[ "$(uname -s)" = Darwin ] || die "this uninstaller is for macOS"

if [ -x "$PREFIX/hatchway-agent" ]; then
    "$PREFIX/hatchway-agent" service uninstall
else
    launchctl bootout system/com.hatchway.agent 2>/dev/null || true
    rm -f "$PLIST"
fi

if [ -L "$LINK" ]; then
    rm -f "$LINK"
fi
rm -rf "$PREFIX" "$PREFIX.new" "$PREFIX.old" "$LOG_DIR" "$DATA_DIR/models"
if [ -z "$KEEP_CONFIG" ]; then
    rm -rf "$DATA_DIR"
fi

if dscl . -read "/Users/$SERVICE_USER" >/dev/null 2>&1; then
    dscl . -delete "/Users/$SERVICE_USER"
fi
if dscl . -read "/Groups/$SERVICE_USER" >/dev/null 2>&1; then
    dscl . -delete "/Groups/$SERVICE_USER"
fi
echo "hatchway-agent is removed."
