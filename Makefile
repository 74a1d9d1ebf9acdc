# The two commands of the README: `make serve` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test install train bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0  # first: the machine's CPU build, which the range below accepts
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the OpenAI-compatible steering server on the embedded models, at 127.0.0.1:8000.
serve: $(STAMP)
	$(BIN)/vlm-steer serve

# The quality benchmark of every method on both splits (held-out seed).
bench: $(STAMP)
	$(BIN)/vlm-steer bench quality --split random,bait --methods none,tita,fisao,tita+fisao,vcd --n 300 \
		--seed 1234 --json runs/quality.json --plot runs/quality.png

# Debian's prometheus (prometheus + promtool) for the deploy checks.
PROMETHEUS := /usr/bin/promtool
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(PROMETHEUS):
	$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq prometheus >/dev/null

test: $(STAMP) $(PROMETHEUS)
	$(BIN)/python -m pytest -q tests

# Retrain the embedded models from scratch (seeded; see README for the time it takes on 2 cores).
train: $(STAMP)
	$(BIN)/vlm-steer train all --seed 0

clean-venv:
	rm -rf $(VENV)
