# `make test` and `make demo` work from a fresh clone: they create .venv and install what they need.
#
# `make demo` converts a checkpoint pair and generates images into outputs/demo. With no arguments it uses the tiny
# original-format checkpoints of tests/fixtures (random weights: the images are noise, but every stage is real).
# With the released checkpoints:
#     make demo TRANSFORMER_CKPT=nnet_ema.pth VQGAN_CKPT=vqgan_jax_strongaug.ckpt [PRESET=enat-l-256]
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# A CPU build of torch: the plain package index serves CUDA builds (several GB of nvidia-* packages). This machine's
# pip finds the CPU wheel below on local disk; elsewhere point pip at PyTorch's CPU wheel index, e.g.
#     make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0+cpu
TORCH_PIP_ARGS ?=

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
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	# only open_clip's BPE vocabulary file is used (offline CLIP tokenizer): without its dependencies (torchvision)
	$(PY) -m pip install -q --no-deps open_clip_torch
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
