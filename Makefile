# The two commands of the README: `make serve` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test install train bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Main job on the embedded models (until the server lands: the quality benchmark on both splits).
serve: $(STAMP)
	$(BIN)/vlm-steer bench quality --split random,bait --methods none --n 300 --seed 1234 \
		--json runs/quality.json --plot runs/quality.png

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Retrain the embedded models from scratch (seeded; about 25 minutes on 2 cores).
train: $(STAMP)
	$(BIN)/vlm-steer train all --seed 0

clean-venv:
	rm -rf $(VENV)
