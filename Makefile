# Two commands for a newcomer: `make demo` and `make test`. Both build .venv from nothing when missing.
# torch is installed first and explicitly: a plain `torch` requirement resolved by another package
# would pull a multi-GB CUDA build. On a laptop use the CPU index:
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-slow lint model clean docs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

model: $(VENV)/.installed
	$(PY) -m meet_lightning download-model smollm2-135m-instruct

demo: model
	$(PY) -m meet_lightning demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed model
	$(PY) -m pytest -q -m slow

# The documentation site (docs/, mkdocs.yml) into build/site; --strict turns every warning (a broken link, a
# missing snippet, a docstring mkdocstrings cannot read) into a failure.
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check meet_lightning tests benchmarks
	$(VENV)/bin/ruff format --check meet_lightning tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
