#!/usr/bin/env bash
# A base image laid out like the official python:3.11-slim-bookworm, for proving the README's
# INSTALL=pip path where no registry is reachable (CI here): a Debian bookworm minbase with
# CPython 3.11 and pip in /usr/local (a venv made by Debian's interpreter, without any Debian
# python3-* module package) and no project dependency installed. Containers here do not trust
# the host's TLS interception, so the wheels come from the host: `pip download` of what the
# project's pyproject asks for (its [docker] extra and its build backend), baked into
# /opt/wheels with PIP_NO_INDEX/PIP_FIND_LINKS set, so the Dockerfile's unchanged
# `pip install ".[docker]"` resolves every dependency from pyproject, offline.
#
#   scripts/build-pip-base-image.sh [IMAGE_TAG]     (default balloonlab-pybase:3.11; needs root)
#   then: BASE_IMAGE=balloonlab-pybase:3.11 INSTALL=pip docker compose up --build
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-balloonlab-pybase:3.11}"
# What the project's pyproject asks for (runtime dependencies, the [docker] extra, the build
# backend): the image is rebuilt when that changes (a label records its hash).
requirements="$(python3 - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
print("\n".join([*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["docker"],
                 *project["build-system"]["requires"], "wheel"]))
PY
)"
key="$(echo "$requirements" | sha256sum | cut -c1-16)"
if [ "$(docker image inspect -f '{{index .Config.Labels "balloonlab.requirements"}}' "$tag" 2>/dev/null)" = "$key" ]; then
    echo "build-pip-base-image: $tag already present for these requirements"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "build-pip-base-image: needs debootstrap" >&2; exit 1; }
mirror="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}"
mirror="${mirror:-http://deb.debian.org/debian}"
work="$(mktemp -d /var/tmp/balloonlab-pybase.XXXXXX)"
trap 'umount "$work/rootfs/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
started=$(date +%s)

echo "build-pip-base-image: wheels for the project's dependencies (pip download on the host, CPython 3.11 manylinux)"
python3 -m venv "$work/venv" >/dev/null
echo "$requirements" > "$work/requirements.txt"
"$work/venv/bin/pip" download --quiet --dest "$work/wheels" --only-binary=:all: --implementation cp \
    --python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any -r "$work/requirements.txt" \
    2> >(grep -v "is ignored" >&2)
echo "build-pip-base-image: $(ls "$work/wheels" | wc -l) wheels ($(du -sh "$work/wheels" | cut -f1))"

echo "build-pip-base-image: debootstrap bookworm minbase + Debian's python3.11 interpreter only"
debootstrap --variant=minbase --include=python3,python3-venv,procps bookworm "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
R="$work/rootfs"
mount -t proc proc "$R/proc"
# /usr/local/bin/python3 and pip, site-packages in /usr/local/lib/python3.11: the official layout
chroot "$R" python3 -m venv /usr/local
umount "$R/proc"
mkdir -p "$R/opt/wheels" && cp "$work"/wheels/* "$R/opt/wheels/"
debian_modules="$(chroot "$R" dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' 'python3-*' 2>/dev/null \
    | awk '/^ii/{print $2}' | grep -vxE 'python3-(minimal|venv|distutils|lib2to3|pip-whl|setuptools-whl|pkg-resources)' || true)"
[ -z "$debian_modules" ] || { echo "build-pip-base-image: Debian python3 module packages crept in: $debian_modules" >&2; exit 1; }
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*
tar -C "$R" -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheels PIP_DISABLE_PIP_VERSION_CHECK=1' \
    --change 'CMD ["python3"]' --change "LABEL balloonlab.requirements=$key" - "$tag" >/dev/null
docker run --rm --network none "$tag" sh -c 'command -v python3 && command -v pip && python3 -V && pip -V; python3 -c "import zmq" 2>/dev/null && exit 1; true' \
    || { echo "build-pip-base-image: $tag is not a clean /usr/local python" >&2; exit 1; }
echo "build-pip-base-image: $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%d MiB", $1/1048576}')) in $(( $(date +%s) - started )) s"
