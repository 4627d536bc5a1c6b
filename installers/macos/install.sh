#!/bin/sh
# Install hatchway-agent on macOS as a launchd daemon, enrolled with a plane, in one command:
#
#   sudo sh install.sh --from hatchway-agent-macos-arm64.tar.gz --plane plane.example.com:8443 \
#       --token hwt-... --model ~/models/llama-3.1-8b.Q4_K_M.gguf=llama-3.1-8b [-- RUN OPTIONS]
#
# Installs the one-folder build under /usr/local/hatchway-agent (linked from /usr/local/bin), creates the hidden
# system user `_hatchway`, copies the models into /Library/Application Support/Hatchway/models, enrolls (config:
# /Library/Application Support/Hatchway/agent.json), and loads the launchd daemon that
# `hatchway-agent service install` renders (/Library/LaunchDaemons/com.hatchway.agent.plist; logs in
# /Library/Logs/Hatchway). Options after `--` go to `hatchway-agent run` (e.g. --gpu-layers 99 for Metal).
# Running it again upgrades in place and keeps the node's identity. uninstall.sh removes it all.
#
# --dry-run prints what would be done, on any system, and changes nothing.
#
# The build matches the machine: on Apple silicon the Metal one (hatchway-agent-metal/ beside this script, else
# hatchway-agent/, which llama.cpp builds with Metal there by default), on an Intel Mac the CPU one; --accel (or
# HATCHWAY_ACCEL) chooses instead, and --detect only prints what it would choose and why.
set -eu

SERVICE_USER=_hatchway
PREFIX=/usr/local/hatchway-agent
LINK=/usr/local/bin/hatchway-agent
DATA_DIR="/Library/Application Support/Hatchway"
CONFIG=$DATA_DIR/agent.json
MODELS_DIR=$DATA_DIR/models

usage() {
    cat <<'EOF'
Usage: sudo sh install.sh [--from DIR|TARBALL] [--plane HOST:PORT] [--token TOKEN] [--model PATH[=NAME]]...
                          [--name NAME] [--insecure] [--reenroll] [--no-start] [--dry-run]
                          [--accel auto|cpu|metal|vulkan] [--detect] [-- RUN OPTIONS]

  --from      the hatchway-agent build: its folder, or a .tar.gz holding it (default: the build for
              this machine's accelerator beside this script, as in a downloaded package)
  --accel     which build to install from the package (or HATCHWAY_ACCEL; default auto: metal on
              Apple silicon, else cpu)
  --detect    print the accelerator this machine gets, why, and the build it would install; change nothing
  --plane     the plane's node service (or HATCHWAY_PLANE)
  --token     the enrollment token from `hatchway admin nodes token create` (or HATCHWAY_ENROLL_TOKEN)
  --model     a GGUF file to serve, under NAME (repeatable); copied into the agent's data folder
  --name      the name this node is listed under (default: the hostname)
  --insecure  plain TCP to the plane, for loopback development only
  --reenroll  enroll again even if this machine is enrolled already
  --no-start  install, but do not load the daemon now (it loads at the next boot)
  --dry-run   print what would be done and change nothing
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

FROM=
PLANE=${HATCHWAY_PLANE:-}
TOKEN=${HATCHWAY_ENROLL_TOKEN:-}
NAME=
MODELS=
INSECURE=
REENROLL=
NO_START=
DRY_RUN=
ACCEL=${HATCHWAY_ACCEL:-auto}
DETECT=
while [ $# -gt 0 ]; do
    case $1 in
        --from) [ $# -ge 2 ] || die "--from needs a value"; FROM=$2; shift 2 ;;
        --plane) [ $# -ge 2 ] || die "--plane needs a value"; PLANE=$2; shift 2 ;;
        --token) [ $# -ge 2 ] || die "--token needs a value"; TOKEN=$2; shift 2 ;;
        --name) [ $# -ge 2 ] || die "--name needs a value"; NAME=$2; shift 2 ;;
        --model)
            [ $# -ge 2 ] || die "--model needs a value"
            MODELS="$MODELS$2
"
            shift 2
            ;;
        --insecure) INSECURE=1; shift ;;
        --reenroll) REENROLL=1; shift ;;
        --no-start) NO_START=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --accel) [ $# -ge 2 ] || die "--accel needs a value"; ACCEL=$2; shift 2 ;;
        --detect) DETECT=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done
# What is left in "$@" goes to `hatchway-agent run`.

# -- the accelerator: asked for, or what this machine has -------------------------------------------------------
case $ACCEL in
    auto | cpu | metal | vulkan) ;;
    cuda) die "--accel cuda: there is no CUDA on macOS; here: auto, cpu, metal or vulkan" ;;
    *) die "--accel $ACCEL: one of auto, cpu, metal, vulkan" ;;
esac
if [ "$ACCEL" != auto ]; then
    ACCEL_WHY="asked for with --accel or HATCHWAY_ACCEL"
else
    system=$(uname -s)
    machine=$(uname -m)
    if [ "$system" = Darwin ] && [ "$machine" = arm64 ]; then
        ACCEL=metal
        ACCEL_WHY="Apple silicon ($machine): Metal"
    elif [ "$system" = Darwin ]; then
        ACCEL=cpu
        ACCEL_WHY="an Intel Mac ($machine): the Metal build is for Apple silicon"
    else
        ACCEL=cpu
        ACCEL_WHY="not a Mac ($system $machine)"
    fi
fi
echo "Accelerator: $ACCEL ($ACCEL_WHY)."

# Every change goes through `run`, so that --dry-run shows them all instead.
run() {
    if [ -n "$DRY_RUN" ]; then
        printf '+'
        printf ' %s' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# A downloaded package holds the builds beside this script: hatchway-agent-<accel>/, the default one
# hatchway-agent/ (with Metal on Apple silicon, llama.cpp's default there).
if [ -z "$FROM" ]; then
    package=$(dirname "$0")
    if [ -x "$package/hatchway-agent-$ACCEL/hatchway-agent" ]; then
        FROM=$package/hatchway-agent-$ACCEL
    elif [ -x "$package/hatchway-agent/hatchway-agent" ]; then
        [ "$ACCEL" != vulkan ] || die "--accel vulkan: this package has no vulkan build ($package/hatchway-agent-vulkan)"
        FROM=$package/hatchway-agent
    fi
fi
if [ -n "$DETECT" ]; then
    echo "Build: ${FROM:-none beside this script (give --from)}."
    exit 0
fi

if [ -z "$DRY_RUN" ]; then
    [ "$(id -u)" -eq 0 ] || die "must run as root: sudo sh $0 ..."
    [ "$(uname -s)" = Darwin ] || die "this installer is for macOS (Linux: installers/linux)"
fi
[ -n "$FROM" ] || { usage >&2; die "--from is required (the hatchway-agent build folder or tarball)"; }
echo "Installing the build from $FROM."

# -- the files: unpacked beside their place, then swapped in --------------------------------------------------
if [ -d "$FROM" ]; then
    source_dir=$FROM
elif [ -f "$FROM" ]; then
    unpacked=$(mktemp -d)
    trap 'rm -rf "$unpacked"' EXIT
    tar -xzf "$FROM" -C "$unpacked"
    source_dir=$unpacked
    [ -d "$unpacked/hatchway-agent" ] && source_dir=$unpacked/hatchway-agent
else
    die "--from $FROM: no such file or directory"
fi
[ -f "$source_dir/hatchway-agent" ] && [ -x "$source_dir/hatchway-agent" ] || die "$FROM holds no hatchway-agent build"
run rm -rf "$PREFIX.new"
run ditto "$source_dir" "$PREFIX.new"
# Downloaded files carry the quarantine flag, and Gatekeeper would refuse to run the unsigned build. (xattr
# fails on files without the flag, as a build made on this machine has.)
run xattr -dr com.apple.quarantine "$PREFIX.new" 2>/dev/null || true
run chown -R root:wheel "$PREFIX.new"
run chmod -R u=rwX,go=rX "$PREFIX.new"
run rm -rf "$PREFIX.old"
if [ -e "$PREFIX" ]; then
    run mv "$PREFIX" "$PREFIX.old"
fi
run mv "$PREFIX.new" "$PREFIX"
run rm -rf "$PREFIX.old"
run mkdir -p "$(dirname "$LINK")"
run ln -sfn "$PREFIX/hatchway-agent" "$LINK"
# In a dry run nothing was copied: ask the build itself.
if [ -n "$DRY_RUN" ]; then
    AGENT=$source_dir/hatchway-agent
else
    AGENT=$PREFIX/hatchway-agent
fi

# -- the service account: a hidden system user (ids below 500 are not shown at login) -----------------------
if [ -n "$DRY_RUN" ] || ! dscl . -read "/Users/$SERVICE_USER" >/dev/null 2>&1; then
    if [ -n "$DRY_RUN" ]; then
        id=ID
    else
        # The first id from 300 up that no user and no group has.
        used=$( (dscl . -list /Users UniqueID; dscl . -list /Groups PrimaryGroupID) | awk '{print $2}')
        id=300
        while printf '%s\n' "$used" | grep -qx "$id"; do
            id=$((id + 1))
        done
        [ "$id" -lt 500 ] || die "no free system id below 500 for $SERVICE_USER"
    fi
    run dscl . -create "/Groups/$SERVICE_USER" PrimaryGroupID "$id"
    run dscl . -create "/Groups/$SERVICE_USER" RealName "Hatchway agent"
    run dscl . -create "/Users/$SERVICE_USER" UniqueID "$id"
    run dscl . -create "/Users/$SERVICE_USER" PrimaryGroupID "$id"
    run dscl . -create "/Users/$SERVICE_USER" UserShell /usr/bin/false
    run dscl . -create "/Users/$SERVICE_USER" NFSHomeDirectory /var/empty
    run dscl . -create "/Users/$SERVICE_USER" RealName "Hatchway agent"
    run dscl . -create "/Users/$SERVICE_USER" IsHidden 1
fi

run mkdir -p "$MODELS_DIR"
run chown "$SERVICE_USER:$SERVICE_USER" "$DATA_DIR" "$MODELS_DIR"
run chmod 0750 "$DATA_DIR" "$MODELS_DIR"

# -- models: each copied in, then named on `run`'s command line -------------------------------------------------
set -f
old_ifs=$IFS
IFS='
'
for spec in $MODELS; do
    case $spec in
        *=*) path=${spec%=*}; served=${spec##*=} ;;
        *) path=$spec; served= ;;
    esac
    [ -f "$path" ] || [ -n "$DRY_RUN" ] || die "--model $path: no such file"
    dest=$MODELS_DIR/$(basename "$path")
    if ! cmp -s "$path" "$dest"; then
        run cp "$path" "$dest"
    fi
    run chown "$SERVICE_USER:$SERVICE_USER" "$dest"
    run chmod 0640 "$dest"
    set -- "$@" --model "$dest${served:+=$served}"
done
IFS=$old_ifs
set +f

# -- enrollment: once; a second run keeps the node's identity --------------------------------------------------
if [ -z "$REENROLL" ] && [ -z "$DRY_RUN" ] &&
    "$AGENT" status --config "$CONFIG" 2>/dev/null | grep -q '"enrolled": true'; then
    echo "Already enrolled ($CONFIG): keeping this node's identity (--reenroll to enroll again)."
else
    [ -n "$PLANE" ] || die "the plane's address is needed: --plane HOST:PORT (or HATCHWAY_PLANE)"
    [ -n "$TOKEN" ] || die "an enrollment token is needed: --token (or HATCHWAY_ENROLL_TOKEN), from the admin"
    # The token goes through the environment, not argv, where `ps` would show it to every user.
    HATCHWAY_ENROLL_TOKEN=$TOKEN
    export HATCHWAY_ENROLL_TOKEN
    run "$AGENT" enroll --plane "$PLANE" --config "$CONFIG" ${NAME:+--name "$NAME"} ${INSECURE:+--insecure}
    unset HATCHWAY_ENROLL_TOKEN
fi

# -- the daemon: its plist is rendered by `hatchway-agent service install`, the one place that writes it ---------
if [ -n "$DRY_RUN" ]; then
    "$AGENT" service install --dry-run --os macos --exec "$PREFIX/hatchway-agent" --config "$CONFIG" \
        --user "$SERVICE_USER" ${NO_START:+--no-start} -- "$@"
    exit 0
fi
"$AGENT" service install --exec "$PREFIX/hatchway-agent" --config "$CONFIG" --user "$SERVICE_USER" \
    ${NO_START:+--no-start} -- "$@"

node=$("$AGENT" status --config "$CONFIG" | sed -n 's/.*"node_id": "\([^"]*\)".*/\1/p')
echo "hatchway-agent is installed as node $node."
echo "  status: sudo hatchway-agent service status    logs: /Library/Logs/Hatchway/agent.log"
