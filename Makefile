# Set-up and everyday commands. `make run` and `make test` create .venv on first use and reuse it after.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the pair our machines serve from local disk; elsewhere pip downloads it.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# The demo stops by itself after STEPS steps; `make run STEPS=0` runs until Ctrl-C.
STEPS ?= 50
PROFILE ?= cpu-small
PYTEST_ARGS ?= -q

.PHONY: run test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=python3"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,dali]' $(TORCH)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/streamssl run --config $(PROFILE) --set run.max_steps=$(STEPS)

# pytest's exit code 5 (no test collected) counts as a failure: a green run must have run tests.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/streamssl bench learner --config $(PROFILE)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
