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


# jobs (local or on Slurm) import the package from this checkout, and `python` is the interpreter that
# runs Snakemake (a --software-deployment-method conda job puts its own env first on PATH instead)
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (os.path.join(workflow.basedir, "src"), os.environ.get("PYTHONPATH")) if p
)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
