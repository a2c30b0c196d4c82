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

.PHONY: demo test test-slow test-gguf gguf lint model clean docs

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

# llama.cpp, for tests/test_gguf.py: llama-cpp-python built from its source package (~10 minutes on 2 cores, so
# not in CI), and llama.cpp's own converter (convert_hf_to_gguf.py with its gguf-py) unpacked from the same
# package under .cache/llama.cpp — used from there, never copied into the project.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CACHE := .cache/llama.cpp
gguf: $(VENV)/.gguf-installed
$(VENV)/.gguf-installed: $(VENV)/.installed
	mkdir -p $(LLAMA_CACHE)/sdist
	$(PY) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(LLAMA_CACHE)/sdist
	tar xzf $(LLAMA_CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CACHE) --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_lora_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py
	CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	  $(PY) -m pip install --quiet "$(LLAMA_CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz[server]" sentencepiece
	touch $@

test-gguf: gguf model
	$(PY) -m pytest -q -m gguf tests/test_gguf.py

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
