# Tables, figures and the HTML report (`snakemake --report report.html`), from every stage's results: one job
# per table and per figure, whose `code` param is the version of the code that builds it
# (kvsharer.report.code_version), so that changing one figure's code reruns that figure's job only.


rule table:
    input:
        policies=policy_files(),
        evals=all_evals(),
        profile=profile_files(),
    output:
        csv=report("results/tables/{table}.csv", caption="../report/table.rst", category="Tables"),
        md="results/tables/{table}.md",
    params:
        main=f"--main-metric {MAIN_METRIC} --main-threshold {MAIN_T}",
        profile=profile_arg,
        code=lambda w: code_version("table", w.table),
    log:
        "logs/tables/{table}.log",
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer tables --only {wildcards.table} --policies {input.policies} --evals {input.evals}"
        " {params.main} {params.profile} --out-dir results/tables > {log} 2>&1"


rule figure:
    input:
        policies=policy_files(),
        evals=all_evals(),
        distances=distance_files(),
        scaling=scaling_files(),
        profile=profile_files(),
    output:
        png=report("results/figures/{figure}.png", caption="../report/figure.rst", category="Figures"),
        pdf="results/figures/{figure}.pdf",
    params:
        main=f"--main-metric {MAIN_METRIC} --main-threshold {MAIN_T}",
        scaling=scaling_arg,
        profile=profile_arg,
        code=lambda w: code_version("figure", w.figure),
    log:
        "logs/figures/{figure}.log",
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer figures --only {wildcards.figure} --policies {input.policies} --evals {input.evals}"
        " --distances {input.distances} {params.main} {params.scaling} {params.profile} --out-dir results/figures"
        " > {log} 2>&1"


rule run_meta:
    output:
        "results/{model}/run_meta.json",
    params:
        config=json.dumps(config, sort_keys=True),
    log:
        "logs/{model}/run_meta.log",
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer run-meta --config-json {params.config:q} --model {wildcards.model} --out {output} > {log} 2>&1"
