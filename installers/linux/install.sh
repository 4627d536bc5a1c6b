#!/bin/sh
# Install hatchway-agent on Linux as a systemd service, enrolled with a plane, in one command:
#
#   sudo sh install.sh --from hatchway-agent-linux-x86_64.tar.gz --plane plane.example.com:8443 \
#       --token hwt-... --model /srv/models/llama-3.1-8b.Q4_K_M.gguf=llama-3.1-8b [-- RUN OPTIONS]
#
# Installs the one-folder build under /opt/hatchway-agent (linked from /usr/local/bin), creates the system user
# `hatchway`, copies the models into /var/lib/hatchway-agent/models (the sandboxed service reads nothing in
# home directories that it does not own), enrolls (config: /etc/hatchway/agent.json), and registers, enables and
# starts the systemd unit that `hatchway-agent service install` renders. Options after `--` go to
# `hatchway-agent run` (e.g. --slots 2 --gpu-layers 99). Running it again upgrades in place: an enrolled node
# keeps its identity and is not enrolled again unless --reenroll is given. uninstall.sh removes it all.
#
# --root DIR installs into a mounted image or a throw-away root instead of this system: nothing is started
# there, and the unit is enabled for that system's next boot.
#
# The build matches the machine: a downloaded package holds one folder per accelerator (hatchway-agent/ for the
# CPU, hatchway-agent-cuda/, hatchway-agent-vulkan/), and the installer takes the CUDA one when `nvidia-smi -L`
# lists a GPU on an x86-64 machine, else the CPU one; --accel (or HATCHWAY_ACCEL) chooses instead, and --detect
# only prints what it would choose and why.
set -eu

SERVICE_USER=hatchway
PREFIX=/opt/hatchway-agent
LINK=/usr/local/bin/hatchway-agent
CONFIG_DIR=/etc/hatchway
CONFIG=$CONFIG_DIR/agent.json
STATE_DIR=/var/lib/hatchway-agent
MODELS_DIR=$STATE_DIR/models

usage() {
    cat <<'EOF'
Usage: sudo sh install.sh [--from DIR|TARBALL] [--plane HOST:PORT] [--token TOKEN] [--model PATH[=NAME]]...
                          [--name NAME] [--insecure] [--reenroll] [--no-start] [--root DIR]
                          [--accel auto|cpu|cuda|vulkan] [--detect] [-- RUN OPTIONS]

  --from      the hatchway-agent build: its folder, or a .tar.gz holding it (default: the build for
              this machine's accelerator beside this script, as in a downloaded package)
  --accel     which build to install from the package (or HATCHWAY_ACCEL; default auto: cuda when
              `nvidia-smi -L` lists a GPU on x86-64, else cpu)
  --detect    print the accelerator this machine gets, why, and the build it would install; change nothing
  --plane     the plane's node service (or HATCHWAY_PLANE)
  --token     the enrollment token from `hatchway admin nodes token create` (or HATCHWAY_ENROLL_TOKEN)
  --model     a GGUF file to serve, under NAME (repeatable); copied into /var/lib/hatchway-agent/models
  --name      the name this node is listed under (default: the hostname)
  --insecure  plain TCP to the plane, for loopback development only
  --reenroll  enroll again even if this machine is enrolled already
  --no-start  install and enable for boot, but do not start now
  --root      install into this root directory (an image, a chroot) instead of /
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
ROOT=
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
        --root) [ $# -ge 2 ] || die "--root needs a value"; ROOT=$2; shift 2 ;;
        --accel) [ $# -ge 2 ] || die "--accel needs a value"; ACCEL=$2; shift 2 ;;
        --detect) DETECT=1; shift ;;
        --insecure) INSECURE=1; shift ;;
        --reenroll) REENROLL=1; shift ;;
        --no-start) NO_START=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done
# What is left in "$@" goes to `hatchway-agent run`.

# -- the accelerator: asked for, or what this machine has -------------------------------------------------------
case $ACCEL in
    auto | cpu | cuda | vulkan) ;;
    metal) die "--accel metal: Metal is for macOS (installers/macos); here: auto, cpu, cuda or vulkan" ;;
    *) die "--accel $ACCEL: one of auto, cpu, cuda, vulkan" ;;
esac
if [ "$ACCEL" != auto ]; then
    ACCEL_ASKED=1
    ACCEL_WHY="asked for with --accel or HATCHWAY_ACCEL"
else
    ACCEL_ASKED=
    ACCEL=cpu
    # nvidia-smi ships with the driver and reads the GPUs through NVML: one "GPU 0: ..." line each.
    if gpus=$(nvidia-smi -L 2>/dev/null) && printf '%s\n' "$gpus" | grep -q '^GPU [0-9]'; then
        first=$(printf '%s\n' "$gpus" | grep '^GPU [0-9]' | head -n 1)
        count=$(printf '%s\n' "$gpus" | grep -c '^GPU [0-9]')
        if [ "$(uname -m)" = x86_64 ]; then
            ACCEL=cuda
            ACCEL_WHY="nvidia-smi lists $count NVIDIA GPU(s): $first"
        else
            ACCEL_WHY="nvidia-smi lists $first, but the CUDA build is for x86-64 and this is $(uname -m)"
        fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        ACCEL_WHY="nvidia-smi is here but lists no GPU (is the NVIDIA driver loaded?)"
    else
        ACCEL_WHY="no NVIDIA GPU (no nvidia-smi on PATH)"
    fi
fi
echo "Accelerator: $ACCEL ($ACCEL_WHY)."

# A downloaded package holds the builds beside this script: hatchway-agent-<accel>/, the CPU one hatchway-agent/.
if [ -z "$FROM" ]; then
    package=$(dirname "$0")
    if [ -x "$package/hatchway-agent-$ACCEL/hatchway-agent" ]; then
        FROM=$package/hatchway-agent-$ACCEL
    elif [ -x "$package/hatchway-agent/hatchway-agent" ]; then
        if [ "$ACCEL" != cpu ] && [ -n "$ACCEL_ASKED" ]; then
            die "--accel $ACCEL: this package has no $ACCEL build ($package/hatchway-agent-$ACCEL)"
        fi
        [ "$ACCEL" = cpu ] || echo "This package has no $ACCEL build (hatchway-agent-$ACCEL/): installing the CPU build."
        FROM=$package/hatchway-agent
    fi
fi
if [ -n "$DETECT" ]; then
    echo "Build: ${FROM:-none beside this script (give --from)}."
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root: sudo sh $0 ..."
[ "$(uname -s)" = Linux ] || die "this installer is for Linux (macOS: installers/macos, Windows: installers/windows)"
[ -n "$FROM" ] || { usage >&2; die "--from is required (the hatchway-agent build folder or tarball)"; }
echo "Installing the build from $FROM."
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || die "--root $ROOT is not a directory"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=
fi
if [ -z "$ROOT" ] && [ -z "$NO_START" ] && [ ! -d /run/systemd/system ]; then
    die "systemd is not running here: pass --no-start to install it for the next boot"
fi

# -- the files: staged next to their place, then swapped in, so a running agent never sees half a folder ----
staging=$ROOT$PREFIX.new
rm -rf "$staging"
mkdir -p "$staging"
if [ -d "$FROM" ]; then
    cp -R "$FROM/." "$staging/"
elif [ -f "$FROM" ]; then
    tar -xzf "$FROM" -C "$staging"
else
    die "--from $FROM: no such file or directory"
fi
# A tarball of the build folder holds hatchway-agent/...: lift its content up one level.
if [ -d "$staging/hatchway-agent" ]; then
    mv "$staging/hatchway-agent" "$staging.inner"
    rm -rf "$staging"
    mv "$staging.inner" "$staging"
fi
[ -f "$staging/hatchway-agent" ] && [ -x "$staging/hatchway-agent" ] || die "$FROM holds no hatchway-agent build"
chown -R 0:0 "$staging"
chmod -R u=rwX,go=rX "$staging"
rm -rf "$ROOT$PREFIX.old"
if [ -e "$ROOT$PREFIX" ]; then
    mv "$ROOT$PREFIX" "$ROOT$PREFIX.old"
fi
mv "$staging" "$ROOT$PREFIX"
rm -rf "$ROOT$PREFIX.old"
mkdir -p "$ROOT$(dirname "$LINK")"
ln -sfn "$PREFIX/hatchway-agent" "$ROOT$LINK"
AGENT=$ROOT$PREFIX/hatchway-agent

# -- the service account: a system user with no login and no home of its own -------------------------------
if ! grep -q "^$SERVICE_USER:" "$ROOT/etc/passwd"; then
    nologin=/usr/sbin/nologin
    [ -x "$ROOT$nologin" ] || nologin=/bin/false
    useradd ${ROOT:+--prefix "$ROOT"} --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell "$nologin" --comment "Hatchway agent" "$SERVICE_USER"
fi
uid=$(grep "^$SERVICE_USER:" "$ROOT/etc/passwd" | cut -d: -f3)
gid=$(grep "^$SERVICE_USER:" "$ROOT/etc/passwd" | cut -d: -f4)

# Config: root's directory, readable by the service's group; the file itself (0600, written by enroll) is
# handed to the service user by `service install`.
mkdir -p "$ROOT$CONFIG_DIR"
chown 0:"$gid" "$ROOT$CONFIG_DIR"
chmod 0750 "$ROOT$CONFIG_DIR"
mkdir -p "$ROOT$MODELS_DIR"
chown "$uid:$gid" "$ROOT$STATE_DIR" "$ROOT$MODELS_DIR"
chmod 0750 "$ROOT$STATE_DIR" "$ROOT$MODELS_DIR"

# -- models: each copied in (unless it is there already), then named on `run`'s command line ------------------
set -f
old_ifs=$IFS
IFS='
'
for spec in $MODELS; do
    case $spec in
        *=*) path=${spec%=*}; served=${spec##*=} ;;
        *) path=$spec; served= ;;
    esac
    [ -f "$path" ] || die "--model $path: no such file"
    dest=$MODELS_DIR/$(basename "$path")
    if ! cmp -s "$path" "$ROOT$dest"; then
        cp "$path" "$ROOT$dest.tmp"
        mv "$ROOT$dest.tmp" "$ROOT$dest"
    fi
    chown "$uid:$gid" "$ROOT$dest"
    chmod 0640 "$ROOT$dest"
    set -- "$@" --model "$dest${served:+=$served}"
done
IFS=$old_ifs
set +f

# -- enrollment: once; a second run keeps the node's identity --------------------------------------------------
if [ -z "$REENROLL" ] && "$AGENT" status --config "$ROOT$CONFIG" 2>/dev/null | grep -q '"enrolled": true'; then
    echo "Already enrolled ($CONFIG): keeping this node's identity (--reenroll to enroll again)."
else
    [ -n "$PLANE" ] || die "the plane's address is needed: --plane HOST:PORT (or HATCHWAY_PLANE)"
    [ -n "$TOKEN" ] || die "an enrollment token is needed: --token (or HATCHWAY_ENROLL_TOKEN), from the admin"
    # The token goes through the environment, not argv, where `ps` would show it to every user.
    HATCHWAY_ENROLL_TOKEN=$TOKEN "$AGENT" enroll --plane "$PLANE" --config "$ROOT$CONFIG" \
        ${NAME:+--name "$NAME"} ${INSECURE:+--insecure} || die "enrollment failed (see above)"
fi

# -- the service: its unit is rendered by `hatchway-agent service install`, the one place that writes it --------
# Without a running systemd (an image, a container), the unit is only enabled for the next boot.
offline_root=$ROOT
if [ -z "$ROOT" ] && [ ! -d /run/systemd/system ]; then
    offline_root=/
fi
"$AGENT" service install --exec "$PREFIX/hatchway-agent" --config "$CONFIG" --user "$SERVICE_USER" \
    ${offline_root:+--root "$offline_root"} ${NO_START:+--no-start} -- "$@"

node=$("$AGENT" status --config "$ROOT$CONFIG" | sed -n 's/.*"node_id": "\([^"]*\)".*/\1/p')
echo "hatchway-agent is installed as node $node."
if [ -z "$offline_root" ]; then
    echo "  status: systemctl status hatchway-agent    logs: journalctl -u hatchway-agent -f"
fi
