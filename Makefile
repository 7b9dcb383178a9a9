# The two commands: `make demo` (install, then the whole pipeline on the offline default, then
# Snakemake's HTML report) and `make test` (install, then the test suite). Both create .venv/ on
# first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

# Every job is a fresh Python process that imports torch. Without cached bytecode (an environment
# that sets PYTHONDONTWRITEBYTECODE, with the --no-compile install below) each one compiles torch's
# modules from source again: measured 7.4 s of CPU per import of torch and its optimiser, against
# 3.3 s once the first job has cached them (docs/benchmarks.md). The cache lives inside .venv/.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test test-all lint clean-results check-seeds

# --no-compile: Python compiles only the modules a run imports, when it first imports them,
# instead of every file of every package at install time (torch alone has thousands)
$(STAMP): requirements.txt pyproject.toml
	@echo "== Installing the pinned environment into $(VENV)/ (first time only; a few minutes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-compile --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@echo "== Running the pipeline on the synthetic world (one log per job under results/logs/)"
	$(BIN)/snakemake --cores $(CORES) all
	@echo "== Writing Snakemake's report"
	$(BIN)/snakemake --cores $(CORES) --report results/report.html
	@echo "== Done: results/table*.md, figures/, results/report.html (open it in a browser)"

# QuARI above the frozen backbone on every synthetic benchmark, backbone, task and metric, on the
# demo's world (run `make demo` first) and on the worlds of SEEDS (docs/offline_world.md)
SEEDS ?= 1 2
SEED_TARGETS := $(foreach b,ilias inquire,$(foreach bb,syn-b256 syn-l384,$(foreach m,identity quari,results/eval/$(b)/$(bb)/$(m).json)))
check-seeds: $(STAMP)
	@for s in $(SEEDS); do \
	  echo "== World seed $$s: the backbone and QuARI (results/seeds/seed$$s/)"; \
	  mkdir -p results/seeds/seed$$s && \
	  printf 'run_id: synthetic-seed%s\nsynthetic:\n  seed: %s\n' $$s $$s > results/seeds/seed$$s/seed.yaml && \
	  $(BIN)/snakemake --cores $(CORES) --snakefile $(CURDIR)/Snakefile --directory results/seeds/seed$$s \
	    $(SEED_TARGETS) --configfile $(CURDIR)/workflow/config/config.yaml \
	    $(CURDIR)/results/seeds/seed$$s/seed.yaml || exit 1; \
	done
	$(BIN)/python -m quari.reporting.compare results/eval $(foreach s,$(SEEDS),results/seeds/seed$(s)/results/eval)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not network"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/snakemake --lint

clean-results:
	rm -rf results/embeddings results/mining results/models results/eval results/logs results/groundtruth
