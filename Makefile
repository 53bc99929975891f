# Two commands on a fresh machine with Python 3.10+:
#   make demo   installs the package into .venv and starts the demo on http://127.0.0.1:8000
#   make test   installs the test dependencies into .venv and runs lint, types and the tests
# make demo DEMO_ARGS="--port 8001" passes its arguments to the demo (--host, --port, --db).
PYTHON ?= python3
VENV ?= .venv
DEMO_ARGS ?=
BIN = $(VENV)/bin

.PHONY: demo test install install-demo venv-ok lint types pytest debian-packages clean

# Python 3.10+, said before a venv is made: a venv of an older Python (or one whose pip
# failed to install) would stay, and every later make fail on it with pip's words alone.
NEEDS_310 = import sys; sys.exit(sys.version_info < (3, 10))

$(BIN)/python:
	@$(PYTHON) -c '$(NEEDS_310)' || { echo "$(PYTHON) is not Python 3.10 or later, which this \
	project needs: pass one, e.g. make $(MAKECMDGOALS) PYTHON=python3.12" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet --upgrade pip \
	  || { rm -rf $(VENV); exit 1; }

# A $(VENV) made by an older Python before this check existed, or by hand.
venv-ok: $(BIN)/python
	@$(BIN)/python -c '$(NEEDS_310)' || { echo "$(VENV) holds a Python older than 3.10: \
	remove it (make clean) and run make $(MAKECMDGOALS) PYTHON=python3.12" >&2; exit 1; }

install: venv-ok
	$(BIN)/python -m pip install --quiet -e '.[test]'

# The demo's own two packages, not the test toolchain (~450 MB of it).
install-demo: venv-ok
	$(BIN)/python -m pip install --quiet -e '.[demo]'

demo: install-demo
	$(BIN)/python -m examples.demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check agentsight_middleware tests examples benchmarks
	$(BIN)/ruff format --check agentsight_middleware tests examples benchmarks

types: install
	$(BIN)/mypy --strict agentsight_middleware tests examples benchmarks

# The browser tests drive Debian's Chromium (never a downloaded browser build), and the
# proxy tests a real nginx in front of the app: both from Debian, installed when missing.
DEBIAN_PACKAGES = chromium nginx-light
debian-packages:
	@command -v chromium >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	  else \
	    echo "the tests need Debian's $(DEBIAN_PACKAGES): sudo apt-get install $(DEBIAN_PACKAGES)" >&2; exit 1; \
	  fi; }

pytest: install debian-packages
	$(BIN)/python -m pytest -q

test: lint types pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
