#!/usr/bin/env bash
# Make a Docker engine and Compose available for the lab and its e2e test (root, Debian):
# installs docker.io, docker-compose and debootstrap from apt when missing, starts dockerd
# when no engine answers, then builds the offline base image (scripts/build-base-image.sh).
#
#   scripts/setup-docker.sh        (.ci/run calls it; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
# Compose v2 (the docker CLI plugin) when present, else Debian's Compose v1.
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    need_apt+=(docker-compose)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup-docker: apt-get install ${need_apt[*]}"
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
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
echo "setup-docker: engine $(docker version -f '{{.Server.Version}}'), cgroup v$(docker info -f '{{.CgroupVersion}}')"
scripts/build-base-image.sh
