# saecat: `make main` installs and runs the main job, `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first so that nothing pulls a CUDA build onto a machine without CUDA. Where no
# CPU wheel lies on disk, name PyTorch's CPU index: make main TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

# The main job: one registry SAE over real text, then questions to the catalog.
RELEASE ?= gpt2-small-res-jb
SAE_ID ?= blocks.8.hook_resid_pre
DATASET ?= NeelNanda/pile-10k
MAX_TOKENS ?= 200000
DB ?= saecat.duckdb

.PHONY: install main test clean

$(BIN)/saecat: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/saecat

main: install
	$(BIN)/saecat ingest --release $(RELEASE) --sae-id $(SAE_ID) --dataset $(DATASET) \
		--max-tokens $(MAX_TOKENS) --db $(DB)
	$(BIN)/saecat saes --db $(DB)
	$(BIN)/saecat sql --db $(DB) "SELECT feature, fire_count, block_count, round(max_activation, 2) AS max_act \
		FROM features JOIN saes USING (sae) WHERE release = '$(RELEASE)' AND sae_id = '$(SAE_ID)' \
		ORDER BY fire_count DESC LIMIT 10"
	$(BIN)/saecat sql --db $(DB) "SELECT i, j, n11 FROM cooccurrence JOIN saes USING (sae) \
		WHERE release = '$(RELEASE)' AND sae_id = '$(SAE_ID)' ORDER BY n11 DESC LIMIT 10"
	$(BIN)/saecat neighbors 0 --release $(RELEASE) --sae-id $(SAE_ID) -k 5 --db $(DB)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
