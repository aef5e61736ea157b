# Tables, figures and the HTML report (`snakemake --report report.html`), from every stage's results.

rule tables:
    input:
        policies=policy_files(),
        evals=all_evals(),
        profile=profile_files(),
    output:
        csv=[
            report(f"results/tables/{t}.csv", caption=f"../report/table_{t}.rst", category="Tables")
            for t in TABLES
        ],
        md=[f"results/tables/{t}.md" for t in TABLES],
    params:
        main=f"--main-metric {MAIN_METRIC} --main-threshold {MAIN_T}",
        profile=profile_arg,
    log:
        "logs/tables.log",
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer tables --policies {input.policies} --evals {input.evals} {params.main} {params.profile}"
        " --out-dir results/tables > {log} 2>&1"


rule figures:
    input:
        policies=policy_files(),
        evals=all_evals(),
        distances=distance_files(),
        scaling=scaling_files(),
        profile=profile_files(),
    output:
        png=[
            report(f"results/figures/{f}.png", caption=f"../report/figure_{f}.rst", category="Figures")
            for f in FIGURES
        ],
        pdf=[f"results/figures/{f}.pdf" for f in FIGURES],
    params:
        main=f"--main-metric {MAIN_METRIC} --main-threshold {MAIN_T}",
        scaling=scaling_arg,
        profile=profile_arg,
    log:
        "logs/figures.log",
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer figures --policies {input.policies} --evals {input.evals} --distances {input.distances}"
        " {params.main} {params.scaling} {params.profile} --out-dir results/figures > {log} 2>&1"


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
