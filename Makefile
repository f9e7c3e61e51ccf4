# Takeoff: `make demo` runs the main job on the embedded default, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
BUF_VERSION := 1.75.0
NODE_EXAMPLE := examples/node
# Test processes side by side, a test file each: most of a test's time is waiting on the servers it starts.
TEST_WORKERS ?= 2

.PHONY: install console-assets tools protos lint format test demo up clean

install: $(VENV)/.installed console-assets

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The console's browser libraries (htmx, uPlot) from npm by its lock file, copied into the package's static
# directory, which git ignores and the wheel ships (pyproject's artifacts).
CONSOLE_FRONTEND := services/takeoff_console/frontend
CONSOLE_VENDOR := services/takeoff_console/static/vendor
console-assets: $(CONSOLE_VENDOR)/htmx.min.js

$(CONSOLE_VENDOR)/htmx.min.js: $(CONSOLE_FRONTEND)/package.json $(CONSOLE_FRONTEND)/package-lock.json
	npm ci --silent --no-audit --no-fund --prefix $(CONSOLE_FRONTEND)
	npm run --silent --prefix $(CONSOLE_FRONTEND) vendor

tools: $(BUF) $(NODE_EXAMPLE)/node_modules/.package-lock.json

$(BUF):
	npm install --silent --no-save --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

# The Node.js client example's packages, from its lock file (tests/e2e/test_node_client.py runs it).
$(NODE_EXAMPLE)/node_modules/.package-lock.json: $(NODE_EXAMPLE)/package.json $(NODE_EXAMPLE)/package-lock.json
	npm ci --silent --no-audit --no-fund --prefix $(NODE_EXAMPLE)

protos: install tools
	$(BUF) format -w
	$(BUF) lint
	$(BIN)/python tools/genprotos.py libs

# The API changes only additively (docs/design.md §4): buf breaking compares with main's last commit.
lint: install tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint
	$(BUF) format --diff --exit-code
	$(BUF) breaking --against '.git#branch=main'

format: install tools
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BUF) format -w

test: lint
	PATH="$(CURDIR)/$(BIN):$(CURDIR)/$(TOOLS)/node_modules/.bin:$$PATH" $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

demo: install
	$(BIN)/takeoff demo

up: install
	$(BIN)/takeoff up

clean:
	rm -rf $(VENV) $(TOOLS) examples/node/node_modules $(CONSOLE_FRONTEND)/node_modules $(CONSOLE_VENDOR) .mypy_cache .pytest_cache .ruff_cache
