# One-command setup + run. Everything is installed from nothing into $(VENV).
#   make demo   - create the venv, install, run the offline embedding job on the bundled demo corpus
#   make test   - create the venv, install, lint, install the browser, run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The tested torch trio (pyproject declares a range; GPU machines may carry a newer torch).
TORCH_PINS := torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: setup demo test lint format clean browser-deps

setup: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[data,serve,index,test,reference,milvus]' $(TORCH_PINS)
	# The reference implementation, for the parity tests only (its declared deps pull
	# pytorchvideo/decord, which do not install on current torchvision; see tests/reference_shim.py).
	$(PIP) install -q --no-deps imagebind-unofficial==0.1.1
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	$(PY) -m pipelines.demo_corpus demo-output/corpus
	RAY_AUTH_MODE=disabled $(VENV)/bin/imagebind-embed --config configs/demo.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The numeric test modules run twice: with this CPU's own kernels (in the whole suite) and with
# the AVX2 kernels forced (what AMD CPUs without AVX-512 and older Intel ones run), so a
# tolerance tuned to one instruction set fails here, not on a user's machine (tests/numerics.py).
NUMERIC_TESTS := tests/test_model_parity.py tests/test_checkpoint.py tests/test_preprocess_audio.py \
	tests/test_preprocess_image.py tests/test_preprocess_video.py tests/test_preprocess_api.py
AVX2_KERNELS := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2

# Debian's chromium and chromedriver for the search page's browser test
# (tests/test_search_page_browser.py). apt runs only when one of them is missing; it needs
# root (CI runs `make test` as root on Debian 12), else sudo.
BROWSER_PKGS := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser-deps:
	@if [ "$$(dpkg-query -W -f='$${db:Status-Status}\n' $(BROWSER_PKGS) 2>/dev/null \
			| grep -cx installed)" = 2 ]; then \
		echo "browser-deps: $(BROWSER_PKGS) already installed"; \
	else \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(BROWSER_PKGS); \
	fi

test: lint browser-deps
	$(AVX2_KERNELS) RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q -m "not slow" $(NUMERIC_TESTS)
	RAY_AUTH_MODE=disabled $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
