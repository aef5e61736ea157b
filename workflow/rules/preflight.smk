# Preflight: the checks the schema cannot express (model sources and architectures, rates vs depth, every
# length vs the windows, memory and GPUs vs the models' sizes as the rules and the profile's set-resources
# request them, task names, packages, hub access), in Snakemake's main process before any job is submitted;
# jobs themselves skip them. A dry run only warns about this host's environment (kvsharer.preflight).
import sys

if workflow.is_main_process:
    try:
        from kvsharer.preflight import dry_run, preflight, snakemake_overrides
    except ImportError as err:  # Snakemake runs outside the project's environment (e.g. conda jobs)
        print(f"kvsharer preflight skipped: {err}", file=sys.stderr)
    else:
        preflight(config, snakemake_overrides(workflow), environment="warn" if dry_run(sys.argv[1:]) else "raise")
