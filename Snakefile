# kvsharer-pipeline: the KVSharer experiments as a DAG.  Run:  snakemake --cores all
# Every rule calls a `python -m kvsharer <stage>` subcommand; the stages are documented in README.md.
import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")


if not config:  # `--configfile other.yaml` replaces the demo config instead of merging into it

    configfile: "config/config.yaml"



validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


# every job (local or on Slurm, venv or conda env) imports the package from this checkout
# (the prefix is formatted like a shell command: doubled braces stand for literal ones)
PACKAGE_SRC = os.path.join(workflow.basedir, "src")
shell.prefix(f'set -euo pipefail; export PYTHONPATH="{PACKAGE_SRC}${{{{PYTHONPATH:+:$PYTHONPATH}}}}"; ')


# the rules' resources come from kvsharer.jobs (torch-free, standard library only)
sys.path.insert(0, PACKAGE_SRC)


include: "workflow/rules/preflight.smk"
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/scaling.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/serving.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
