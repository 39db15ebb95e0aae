# One image for hostd and the guests (the command chooses). BASE_IMAGE must have python3 ≥ 3.11;
# INSTALL=pip installs the project and its dependencies from PyPI (the default, for the
# official Python image); INSTALL=none expects the base image to carry them already (the
# offline image made by scripts/build-base-image.sh from Debian packages).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG INSTALL=pip
WORKDIR /opt/balloonlab
COPY pyproject.toml README.md ./
COPY protocol protocol
COPY cgroups cgroups
COPY guestagent guestagent
COPY hostd hostd
COPY lab lab
COPY balloonlab balloonlab
COPY balloonctl balloonctl
RUN if [ "$INSTALL" = pip ]; then pip install --no-cache-dir ".[docker]" ; fi \
 && python3 -c "import zmq, msgpack, psutil, numpy, prometheus_client, rich, docker" \
 || { echo "the base image lacks python3 modules zmq/msgpack/psutil/numpy/prometheus_client/rich/docker: use INSTALL=pip" >&2; exit 1; }
ENV PYTHONPATH=/opt/balloonlab PYTHONUNBUFFERED=1
# hostd: agents, control (balloonctl), HTTP (/metrics)
EXPOSE 5555 5556 8055
CMD ["python3", "-m", "hostd", "--help"]
