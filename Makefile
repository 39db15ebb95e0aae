# The one test command (README, .ci/run): make test
# It makes a virtualenv in .venv, installs the project with its test extras, then runs
# lint, types and the whole pytest suite. Tests that need root, swap or Docker skip with a
# stated reason outside CI; under CI=true they fail instead of skipping.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test test-v2 venv lint typecheck pytest bench clean

test: venv lint typecheck pytest

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

lint: venv
	$(BIN)/ruff check protocol hostd guestagent lab tests bench balloonlab cgroups balloonctl

typecheck: venv
	$(BIN)/mypy protocol hostd guestagent lab balloonlab cgroups balloonctl bench \
		scripts/attacks/run_attacks.py scripts/vm/mkinitramfs.py scripts/vm/extract-vmlinux.py scenarios/redis_latency.py

pytest: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The v2 lane (root; .ci/run runs it after `make test`): a cgroup-v2 Debian guest with systemd
# booted under QEMU (TCG, or KVM where the CPU has real VT-x/AMD-V) runs tests/v2 inside; the
# image is built from Debian's packages once and cached, keyed on its inputs, with Docker's
# images already imported (scripts/vm/build-image.sh; BALLOONLAB_VM_CACHE moves the cache).
# Two runs at once are safe: each shares a lock on its image, a build removes only unlocked
# old images. Fails when a scenario fails, the guest does not boot, or the run exceeds
# BALLOONLAB_VM_TIMEOUT (default 1500 s). JUnit XML, figures.json and logs: artifacts/v2/.
# V2_ARGS go to pytest inside the guest, split on spaces: write -k expressions without them,
# e.g. make test-v2 V2_ARGS="-k '(attach)or(reclaim)'". V2_COMPOSE=1 adds the compose lab with
# Compose v2 (not in CI's set: under TCG at host load 10-30 `compose up --build` alone took 555 s
# and the scenario >= 15 min, while the lane without it already overran 1200 s; README).
# `balloonctl attach` on v2 is in the lane (V2_ATTACH=0 leaves it out; README).
V2_COMPOSE ?= 0
V2_ATTACH ?= 1
test-v2:
	V2_COMPOSE=$(V2_COMPOSE) V2_ATTACH=$(V2_ATTACH) scripts/vm/run.sh $(V2_ARGS)

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
