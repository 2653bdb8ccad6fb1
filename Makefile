# `make test` and `make demo` work from a fresh clone: they create .venv and install what they need.
#
# `make demo` converts a checkpoint pair and generates images into outputs/demo. With no arguments it uses the tiny
# original-format checkpoints of tests/fixtures (random weights: the images are noise, but every stage is real).
# With the released checkpoints:
#     make demo TRANSFORMER_CKPT=nnet_ema.pth VQGAN_CKPT=vqgan_jax_strongaug.ckpt [PRESET=enat-l-256]
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

TRANSFORMER_CKPT ?=
VQGAN_CKPT ?=
PRESET ?= enat-l-256
ifeq ($(TRANSFORMER_CKPT),)
DEMO_MODEL := outputs/enat-tiny-random
DEMO_CONVERT := --transformer-checkpoint tests/fixtures/enat_tiny.pth --vqgan-checkpoint tests/fixtures/vqgan_tiny.ckpt \
	--num-attention-heads 4 --num-encoder-layers 3
DEMO_CONDITION := --class-labels 1 4 9
else
DEMO_MODEL := outputs/$(PRESET)
DEMO_CONVERT := --transformer-checkpoint $(TRANSFORMER_CKPT) --vqgan-checkpoint $(VQGAN_CKPT) --preset $(PRESET)
DEMO_CONDITION := --prompt "golden retriever" "tabby" "volcano" "red fox"
endif

.PHONY: test demo style quality

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch may pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	test -d $(DEMO_MODEL) || $(PY) conversion/convert_enat_to_diffusers.py $(DEMO_CONVERT) --output-dir $(DEMO_MODEL)
	$(PY) examples/generate.py --model $(DEMO_MODEL) $(DEMO_CONDITION) --output-dir outputs/demo --overwrite
ifeq ($(TRANSFORMER_CKPT),)
	@echo "note: this ran the whole pipeline on a tiny random-weight model (no trained model ships with the repo);"
	@echo "      pass TRANSFORMER_CKPT=... VQGAN_CKPT=... to generate with the released ENAT-L weights."
endif

style: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

quality: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check .
