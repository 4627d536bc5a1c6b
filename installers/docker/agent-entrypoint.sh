#!/bin/sh
# The agent container's entry point: enroll on the first start (the state volume keeps the node's identity
# across restarts and upgrades), then become `hatchway-agent run` with the container's arguments.
#
#   HATCHWAY_PLANE              the plane's node service, HOST:PORT
#   HATCHWAY_ENROLL_TOKEN       the enrollment token, or
#   HATCHWAY_ENROLL_TOKEN_FILE  a file holding it (compose.yaml's one-shot token service writes one)
#   HATCHWAY_NODE_NAME          the name this node is listed under (default: the container's hostname)
set -eu

config=${HATCHWAY_AGENT_CONFIG:-/var/lib/hatchway-agent/agent.json}

if ! hatchway-agent status --config "$config" 2>/dev/null | grep -q '"enrolled": true'; then
    token=${HATCHWAY_ENROLL_TOKEN:-}
    if [ -z "$token" ] && [ -n "${HATCHWAY_ENROLL_TOKEN_FILE:-}" ] && [ -s "$HATCHWAY_ENROLL_TOKEN_FILE" ]; then
        token=$(cat "$HATCHWAY_ENROLL_TOKEN_FILE")
    fi
    if [ -z "$token" ] || [ -z "${HATCHWAY_PLANE:-}" ]; then
        echo "hatchway-agent: not enrolled yet: set HATCHWAY_PLANE and HATCHWAY_ENROLL_TOKEN" >&2
        exit 3
    fi
    HATCHWAY_ENROLL_TOKEN=$token hatchway-agent enroll --plane "$HATCHWAY_PLANE" --config "$config" \
        ${HATCHWAY_NODE_NAME:+--name "$HATCHWAY_NODE_NAME"}
fi

exec hatchway-agent run --config "$config" "$@"
