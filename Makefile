# `make test` and `make demo` work in a new checkout, offline: they create .venv and install what they need.
#
# `make demo` generates images into outputs/demo with the shipped text-to-image model (pretrained/enat-shapes), or,
# given the released checkpoints, converts them first (see DEMO_MODEL below).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# A CPU build of torch: the plain package index serves CUDA builds (several GB of nvidia-* packages). Where pip does
# not find the CPU wheel below (a local wheel directory or a mirror), point it at PyTorch's CPU wheel index, e.g.
#     make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0+cpu
TORCH_PIP_ARGS ?=

# `make demo` generates with the shipped text-to-image model, pretrained/enat-shapes (its model card gives its recipe;
# `make train-demo` trains the same design with a shorter ENAT stage; if the folder is missing, the demo runs every
# stage on the tiny random-weight original-format fixture checkpoints of tests/fixtures instead: their images are
# noise). With the released ImageNet checkpoints it converts them first
# (again whenever they change):
#     make demo TRANSFORMER_CKPT=nnet_ema.pth VQGAN_CKPT=vqgan_jax_strongaug.ckpt [PRESET=enat-l-256]
TRANSFORMER_CKPT ?=
VQGAN_CKPT ?=
PRESET ?= enat-l-256
ifneq ($(TRANSFORMER_CKPT),)
$(if $(wildcard $(TRANSFORMER_CKPT)),,$(error TRANSFORMER_CKPT=$(TRANSFORMER_CKPT): no such file))
$(if $(wildcard $(VQGAN_CKPT)),,$(error VQGAN_CKPT=$(VQGAN_CKPT): no such file (the demo needs both checkpoints)))
DEMO_MODEL := outputs/converted/$(notdir $(TRANSFORMER_CKPT))-$(PRESET)
DEMO_CONDITION := --prompt "golden retriever" "tabby" "volcano" "red fox"
else ifneq ($(wildcard pretrained/enat-shapes/model_index.json),)
DEMO_MODEL := pretrained/enat-shapes
DEMO_CONDITION := --prompt "a small green circle at the top and a large red triangle at the bottom" \
	"a small yellow triangle at the top and a large green circle at the bottom" \
	"a large purple square in the centre" "a small blue circle at the top" \
	"a large blue square at the top and a small red circle at the bottom" \
	"a large red square on the left"
else
TRANSFORMER_CKPT := tests/fixtures/enat_tiny.pth
VQGAN_CKPT := tests/fixtures/vqgan_tiny.ckpt
PRESET := tiny
DEMO_MODEL := outputs/converted/enat-tiny-random
DEMO_CONDITION := --class-labels 1 4 9
endif
CONVERT_ARCH := $(if $(filter tiny,$(PRESET)),--num-attention-heads 4 --num-encoder-layers 3,--preset $(PRESET))

# `make train-demo`: data -> patch-id VQ model -> CLIP text encoder -> ENAT (token groups, then one position per
# token) -> VQ decoder fine-tune -> sampling sweep -> ShapesEval, into $(TRAIN_DIR), in 74 minutes on a 2-core
# Intel Xeon with AMX (the model card has each stage's time; its ENAT steps take 1.3 times as long on a 2-core AVX-512
# AMD EPYC: about 90 minutes there, estimated). Every stage resumes from its last checkpoint when interrupted; a
# finished stage is skipped. Copy the result over the shipped model with `make install-demo-model`.
TRAIN_DIR ?= outputs/train-demo
VQ_SEED ?= 0
CLIP_SEED ?= 0
# The ENAT stage trains on 2 x 2 token groups first (a training image 2.5 times cheaper), then fine-tunes the same
# network with one position per token (--ungroup), where a group's tokens can agree with each other.
ENAT_GROUP_STEPS ?= 4000
ENAT_TOKEN_STEPS ?= 4000
# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise: the VQ model and the ENAT stages get every core. The
# text encoder runs on the thread count its recipe was measured with: the thread count changes the numerics, and this
# short run is sensitive to it (on 1 thread its held-out retrieval is 85.1 % instead of 93.7 %).
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no \
	--num_cpu_threads_per_process
ACCELERATE := $(LAUNCH) $(shell nproc)
SHAPES_TRAIN := $(TRAIN_DIR)/data/train
SHAPES_VAL := $(TRAIN_DIR)/data/validation
ENAT_RECIPE := --train_data_dir $(SHAPES_TRAIN) --no_random_flip --train_batch_size 32 --lr_scheduler cosine \
	--adam_beta1 0.9 --ema_decay 0.995 --beta_alpha_beta 2 1 --region_mask_prob 0.5 --reuse_prob 0.25 \
	--checkpoints_total_limit 2 --seed 0 --report_to tensorboard --resume_from_checkpoint latest
ENAT_GROUP_ARGS := $(ENAT_RECIPE) --vqvae_name_or_path $(TRAIN_DIR)/vqgan/vqvae \
	--text_encoder_name_or_path $(TRAIN_DIR)/clip --transformer_config examples/shapes/transformer_config.json \
	--sincos_position_embeddings --output_dir $(TRAIN_DIR)/enat-groups --max_train_steps $(ENAT_GROUP_STEPS) \
	--learning_rate 2e-3 --lr_warmup_steps 200 --checkpointing_steps 500
ENAT_TOKEN_ARGS := $(ENAT_RECIPE) --pretrained_model_name_or_path $(TRAIN_DIR)/enat-groups --ungroup \
	--token_cache_dir $(TRAIN_DIR)/enat-groups/token_cache --output_dir $(TRAIN_DIR)/enat \
	--max_train_steps $(ENAT_TOKEN_STEPS) --learning_rate 1e-3 --lr_warmup_steps 100 --checkpointing_steps 250 \
	--validation_steps $(ENAT_TOKEN_STEPS) --validation_guidance_scale 2 --validation_mask_temperature 4.5 \
	--validation_sampling_temperature 0.5 --validation_prompts \
	"a large red circle on the left and a small blue square on the right" "a small yellow triangle at the top" \
	"a large purple triangle in the centre" "a small green square at the bottom and a large blue circle at the top"

.PHONY: test demo train-demo install-demo-model space bench style quality

# --no-compile: pip does not byte-compile every file of every package at install time (torch alone has thousands);
# Python compiles the modules that are imported, on first use
PIP_INSTALL := $(PY) -m pip install -q --no-compile

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) "$(TORCH)" $(TORCH_PIP_ARGS)
	# only open_clip's BPE vocabulary file is used (offline CLIP tokenizer), and only torch-fidelity's InceptionV3
	# (examples/evaluate.py): both without their dependencies (torchvision)
	$(PIP_INSTALL) --no-deps open_clip_torch "torch-fidelity>=0.3"
	$(PIP_INSTALL) -e ".[test]"
	touch $@

# Tests run in one worker process per core (pytest-xdist), each on one thread: the tiny test models run fastest so,
# and the workers never oversubscribe the machine.
test: $(VENV)/.space-installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto tests

demo: $(VENV)/.installed $(DEMO_MODEL)/model_index.json
	$(PY) examples/generate.py --model $(DEMO_MODEL) $(DEMO_CONDITION) --output-dir outputs/demo --overwrite
ifeq ($(PRESET),tiny)
	@echo "note: pretrained/enat-shapes is missing, so this ran every stage on a tiny random-weight model (noise"
	@echo "      images); make train-demo && make install-demo-model recreate the shipped text-to-image model."
endif

outputs/converted/%/model_index.json: $(TRANSFORMER_CKPT) $(VQGAN_CKPT) | $(VENV)/.installed
	$(PY) conversion/convert_enat_to_diffusers.py --transformer-checkpoint $(TRANSFORMER_CKPT) \
		--vqgan-checkpoint $(VQGAN_CKPT) $(CONVERT_ARCH) --output-dir outputs/converted/$* --overwrite

train-demo: $(TRAIN_DIR)/enat-shapes/shapes_eval.json
	@echo "trained pipeline: $(TRAIN_DIR)/enat-shapes (ShapesEval: $<); ship it with: make install-demo-model"

$(SHAPES_TRAIN)/metadata.jsonl: | $(VENV)/.installed
	$(PY) -m enat_diffusers.data.shapes --output-dir $(TRAIN_DIR)/data --num-train 30000 --num-val 1000 --seed 0 --overwrite

# One token id per 4x4 patch: plain background, or one colour over one of the 48 commonest 16-pixel masks
$(TRAIN_DIR)/vqgan/vqvae/config.json: $(SHAPES_TRAIN)/metadata.jsonl
	$(ACCELERATE) examples/shapes/train_patch_vq.py --train_data_dir $(SHAPES_TRAIN) --validation_data_dir $(SHAPES_VAL) \
		--output_dir $(TRAIN_DIR)/vqgan --num_masks 48 --train_batch_size 32 --max_train_steps 1000 \
		--learning_rate 3e-3 --checkpointing_steps 100 --seed $(VQ_SEED) --resume_from_checkpoint latest

# A VQ model whose reconstructions fail ShapesEval: stop before the ENAT stage. The ENAT stage learns the ids, which
# the encoder gets right 99 % of the time; the decoder is fine-tuned after it. With 1,000 steps the reconstructions
# pass 99.5-99.8 % (seeds 0 and 1, 1 and 2 threads); the 600 steps of the shipped model's recipe left small triangles
# in the wrong colour and small squares round on some CPUs and seeds (83.7-97.7 %): the check catches a decoder that
# failed.
$(TRAIN_DIR)/vqgan/tokenizer_report.json: $(TRAIN_DIR)/vqgan/vqvae/config.json
	$(PY) examples/shapes/tokenizer_report.py --vqvae $(TRAIN_DIR)/vqgan/vqvae --data $(SHAPES_VAL) \
		--min-shapes-eval 85 --json $@.tmp || (rm -f $@.tmp; echo "retrain the VQ model with another seed, keeping" \
		"the data and the text encoder: rm -r $(TRAIN_DIR)/vqgan && make train-demo TRAIN_DIR=$(TRAIN_DIR) VQ_SEED=1" \
		&& false)
	mv $@.tmp $@

# A text encoder that confuses captions caps everything trained on it: stop before the ENAT stage when its held-out
# caption -> image retrieval is below 85 %. The recipe's encoder depends on the CPU's kernels and thread count (93.7 %
# on 2 threads of an AVX2 EPYC, 85.1 % on 1; 89.3 % on 2 threads of an AVX-512 EPYC), and an 85.1 % encoder gave the
# same ShapesEval as the 93.7 % one (docs/shapes-model-experiments.md): the check catches an encoder that failed.
$(TRAIN_DIR)/clip/held_out_retrieval.json: $(SHAPES_TRAIN)/metadata.jsonl
	$(LAUNCH) 2 examples/train_text_encoder.py --train_data_dir $(SHAPES_TRAIN) --validation_data_dir $(SHAPES_VAL) \
		--output_dir $(TRAIN_DIR)/clip --max_length 32 --text_hidden_size 64 --text_num_layers 2 --text_num_heads 4 \
		--projection_dim 64 --vision_hidden_size 64 --vision_num_layers 2 --vision_num_heads 4 --resolution 64 \
		--patch_size 8 --train_batch_size 128 --max_train_steps 1000 --learning_rate 2e-3 --lr_warmup_steps 100 \
		--hard_negative_weight 1.0 --checkpointing_steps 250 --seed $(CLIP_SEED) --resume_from_checkpoint latest \
		--min_held_out_retrieval 0.85 || (rm -f $@; echo "retrain the text encoder in another folder, e.g." \
		"make train-demo TRAIN_DIR=$(TRAIN_DIR)-seed1 CLIP_SEED=1" && false)

$(TRAIN_DIR)/enat-groups/model_index.json: $(TRAIN_DIR)/vqgan/vqvae/config.json \
		$(TRAIN_DIR)/clip/held_out_retrieval.json | $(TRAIN_DIR)/vqgan/tokenizer_report.json
	$(ACCELERATE) examples/train_enat.py $(ENAT_GROUP_ARGS)

$(TRAIN_DIR)/enat/model_index.json: $(TRAIN_DIR)/enat-groups/model_index.json
	$(ACCELERATE) examples/train_enat.py $(ENAT_TOKEN_ARGS)

# The VQ decoder learns to draw clean shapes from the token grids the transformer samples
$(TRAIN_DIR)/enat-shapes/model_index.json: $(TRAIN_DIR)/enat/model_index.json
	$(ACCELERATE) examples/finetune_vq_decoder.py --pretrained_model_name_or_path $(TRAIN_DIR)/enat \
		--train_data_dir $(SHAPES_TRAIN) --output_dir $(TRAIN_DIR)/enat-shapes --max_train_steps 800 \
		--train_batch_size 32 --sampling_temperature 0.5 --checkpointing_steps 200 --seed 0 \
		--resume_from_checkpoint latest

# the sampling defaults (guidance, mask temperature) chosen by ShapesEval on other prompts than the reported ones; 300
# of them, as 100 rank settings a few points apart on noise
$(TRAIN_DIR)/enat-shapes/sampling_sweep.json: $(TRAIN_DIR)/enat-shapes/model_index.json
	$(PY) examples/shapes/sampling_sweep.py --model $(TRAIN_DIR)/enat-shapes --num-prompts 300 \
		--guidance-scales 1.5 2 --mask-temperatures 1.5 3 9 --json $@.tmp --write-best
	mv $@.tmp $@

$(TRAIN_DIR)/enat-shapes/shapes_eval.json: $(TRAIN_DIR)/enat-shapes/sampling_sweep.json
	$(PY) -m enat_diffusers.evaluation.shapes --model $(TRAIN_DIR)/enat-shapes --num-prompts 500 --steps 8 --json > $@.tmp
	mv $@.tmp $@

# Re-saves the trained pipeline (its model files only: no checkpoints or logs) as pretrained/enat-shapes.
install-demo-model: $(TRAIN_DIR)/enat-shapes/shapes_eval.json
	@test ! -e pretrained/enat-shapes/model_index.json -o "$(FORCE)" = 1 || \
		(echo "pretrained/enat-shapes exists; pass FORCE=1 to replace its model files" && false)
	$(PY) -c "from enat_diffusers import ENATPipeline; \
		ENATPipeline.from_pretrained('$(TRAIN_DIR)/enat-shapes').save_pretrained('pretrained/enat-shapes')"

# The demo's requirements stay apart from the package's (gradio pins pillow<13); the browser test drives Debian's
# chromium when it is installed (`apt-get install chromium`; .ci/run does it), and is skipped otherwise.
SPACE_PORT ?= 7860
$(VENV)/.space-installed: $(VENV)/.installed examples/spaces/requirements.txt
	$(PIP_INSTALL) -r examples/spaces/requirements.txt playwright==1.65.2
	touch $@

space: $(VENV)/.space-installed
	$(PY) examples/spaces/app.py --host 127.0.0.1 --port $(SPACE_PORT)

# CPU benchmarks, each variant timed side by side (interleaved) in one run, on the CPU that runs them (random weights
# with the released ENAT-L-256 checkpoint's shapes): float32, bfloat16 and each quantized form at batch 4, 8 steps,
# and which to use on this CPU (benchmarks/README.md, "Quantization"); the original's computation vs ours, reuse on
# and off (float32, batch 1, after a correctness gate against the recorded original ids); editing vs generating with
# the shipped Shapes model. ENAT_REPO: a checkout of the authors' code (LeapLabTHU/ENAT, not vendored), timed too in
# float32 (its vendored timm needs einops; torchvision, which it imports but sampling never uses, is shimmed).
ENAT_REPO ?=
bench: $(VENV)/.installed
	$(if $(ENAT_REPO),$(PY) -m pip install -q einops)
	@mkdir -p outputs/bench
	$(PY) benchmarks/benchmark_quantization.py --model enat-l-256 --batch-size 4 --steps 8 --repeats 3 \
		$(if $(ENAT_REPO),--original-repo $(ENAT_REPO)) --json outputs/bench/quantization.json
	$(PY) benchmarks/benchmark_sampling.py --model enat-l-256 --dtype float32 --batch-size 1 \
		--json outputs/bench/sampling.json
	$(PY) benchmarks/benchmark_editing.py --model pretrained/enat-shapes --repeats 5

style: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

quality: $(VENV)/.installed
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check .
