# The one test command (README, .ci/run): make test
# It makes a virtualenv in .venv, installs the project with its test extras, then runs
# lint, types and the whole pytest suite. Tests that need root, swap or Docker skip with a
# stated reason outside CI; under CI=true they fail instead of skipping.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test venv lint typecheck pytest bench clean

test: venv lint typecheck pytest

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

lint: venv
	$(BIN)/ruff check protocol hostd guestagent lab tests bench balloonlab

typecheck: venv
	$(BIN)/mypy protocol hostd guestagent lab balloonlab

pytest: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
