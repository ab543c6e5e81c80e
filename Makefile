# saecat: `make main` installs and runs the main job, `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install takes its versions from constraints.txt, the set the suite last passed on, so a
# new machine gets what CI tested rather than whatever resolved that day. `make lock` resolves
# anew within pyproject.toml's ranges, rewrites it and runs the suite on the new set.
LOCK := constraints.txt
PIP_INSTALL = $(BIN)/pip install -q -c $(LOCK)
# torch goes in first so that nothing pulls a CUDA build onto a machine without CUDA. Where no
# CPU wheel lies on disk, name PyTorch's CPU index: make main TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= $(shell grep '^torch==' $(LOCK))
TORCH_INDEX ?=
EXTRAS := test,ray,demo,explain

# The main job, offline and real: the demo SAE (demo/sae, trained with sae-lens on layer 5 of
# Gemma 3 270M) over the standard library's code and prose, then the tour. With the hub
# reachable, the same job ingests Gemma Scope 2's SAE of that layer instead:
#   make main RELEASE=gemma-scope-2-270m-pt-res SAE_ID=layer_5_width_16k_l0_small SAE_PATH=
RELEASE ?= saecat-demo
SAE_ID ?= gemma-3-270m/layer_5/topk_3k
SAE_PATH ?= demo/sae
MODEL ?= $$($(BIN)/python -m demo.gemma)
DATASET ?= demo/build/stdlib.jsonl
MAX_TOKENS ?= 150000
# BOS and one 256-token block per document: the contexts the demo SAE was trained on, and no
# attention over long padded documents on a CPU
MAX_DOC_TOKENS ?= 257
DB ?= saecat.duckdb
FIGURES ?= figures
# Explanations for a few mid-density features, written and scored by the demo's Gemma 3 270M in
# this process (a small pretrained model: it shows the pipeline, not good explanations); any
# OpenAI-compatible endpoint does better: EXPLAINER=http://localhost:8000/v1 EXPLAINER_MODEL=...
EXPLAINER ?= $$($(BIN)/python -m demo.gemma)
EXPLAINER_MODEL ?=
EXPLAIN_WHERE ?= density BETWEEN 0.002 AND 0.05
EXPLAIN_FEATURES ?= 8

.PHONY: install main demo test lock clean

$(BIN)/saecat: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP_INSTALL) -e '.[test,ray]'
	touch $@

install: $(BIN)/saecat

$(BIN)/.demo: $(BIN)/saecat
	$(PIP_INSTALL) -e '.[$(EXTRAS)]'
	touch $@

demo/build/stdlib.jsonl:
	$(BIN)/python -m demo.corpus $@

main: $(BIN)/.demo demo/build/stdlib.jsonl
	$(BIN)/saecat ingest --release $(RELEASE) --sae-id $(SAE_ID) $(if $(SAE_PATH),--sae-path $(SAE_PATH)) \
		--model "$(MODEL)" --dataset $(DATASET) --group-column kind --max-tokens $(MAX_TOKENS) \
		--max-doc-tokens $(MAX_DOC_TOKENS) --db $(DB)
	$(BIN)/saecat explain --release $(RELEASE) --sae-id $(SAE_ID) --explainer "$(EXPLAINER)" \
		$(if $(EXPLAINER_MODEL),--explainer-model $(EXPLAINER_MODEL)) --where "$(EXPLAIN_WHERE)" \
		--limit $(EXPLAIN_FEATURES) --db $(DB)
	$(BIN)/saecat tour --release $(RELEASE) --sae-id $(SAE_ID) --figures $(FIGURES) --db $(DB)

demo: main

# The page tests drive Debian's Chromium with Playwright (no browser download); the Noto fonts give
# it a glyph for every script a token may be in.
BROWSER := /usr/bin/chromium
BROWSER_PACKAGES := chromium fonts-noto-core fonts-noto-cjk
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
$(BROWSER):
	$(APT_GET) install -y -q --no-install-recommends $(BROWSER_PACKAGES) || \
		{ $(APT_GET) update -q && $(APT_GET) install -y -q --no-install-recommends $(BROWSER_PACKAGES); }

# the tests explain features with the demo's Gemma 3 270M behind a real OpenAI-compatible server.
# One worker per core (at most 4), each test file whole on one worker (its module fixtures built once)
test: $(BIN)/.demo $(BROWSER)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# A fresh venv with the newest versions pyproject.toml allows (torch as TORCH says), frozen into
# $(LOCK) (torch without its +cpu/+cuXXX tag, so either build satisfies it), then the suite on them.
lock:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	{ sed -n '/^#/p' $(LOCK); $(BIN)/pip freeze --all --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	touch $(BIN)/saecat $(BIN)/.demo
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo/build
