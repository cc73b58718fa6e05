# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both bootstrap .venv with the CPU build of torch pinned (constraints-cpu.txt), then the package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# the organism is built once and shared by the demo and the tests
export CONCEPT_INFLUENCE_CACHE ?= $(CURDIR)/.cache

.PHONY: demo test test-fast lint bench docs docs-cli install clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e '.[dev,docs]'
	# kronfluence is a test-only reference; --no-deps keeps torchvision (and a CUDA torch) out
	$(BIN)/python -m pip install -q --no-deps kronfluence==1.0.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/concept-influence demo --out runs/demo

# one pytest-xdist worker per core, whole test files to a worker (their module fixtures are built once), and one
# intra-op thread each: the suite's tiny models gain nothing from more threads, and lose badly when cores are shared.
# The organisms are built once under a lock, whichever worker asks first. TEST_WORKERS=0 runs in one process. The
# 15 slowest tests are listed (spreading the organism variants' tests over the workers measured slower: 16 min 44 s
# against 14 min 35 s cold, the workers then wait on each other's organism builds).
TEST_WORKERS ?= auto
PYTEST := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# ruff: lint rules (line length 120 included) and the formatter's style, both enforced (CI runs this)
lint: $(STAMP)
	$(BIN)/ruff check concept_influence tests bench docs/gen_cli.py
	$(BIN)/ruff format --check concept_influence tests bench docs/gen_cli.py

# the documentation site (mkdocs.yml, docs/) into site/; --strict turns every warning (a broken link) into an error
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# rewrite docs/cli.md from every command's --help (commit the result); runs no tests
docs-cli: $(STAMP)
	$(BIN)/python docs/gen_cli.py

bench: $(STAMP)
	for script in bench/*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .cache runs .pytest_cache site
