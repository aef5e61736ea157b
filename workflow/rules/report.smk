# Tables, figures and the HTML report (`snakemake --report report.html`): one job per table and per figure, whose
# `code` param is the version of the code that builds it (kvsharer.report.code_version), so that changing one
# figure's code reruns that figure's job only. Each job's inputs are the result files it reads, no more
# (REPORT_INPUTS, common.smk): a table is written as soon as its own results exist (the headline ones and the jobs
# they need first: HEADLINE, common.smk), and it reruns whenever one of the files it reads changes.


rule table:
    input:
        unpack(report_inputs("table")),
    output:
        csv=report("results/tables/{table}.csv", caption="../report/table.rst", category="Tables"),
        md="results/tables/{table}.md",
    params:
        main=f"--main-metric {MAIN_METRIC} --main-threshold {MAIN_T}",
        profile=profile_arg,
        serving=serving_arg,
        code=lambda w: code_version("table", w.table),
    log:
        "logs/tables/{table}.log",
    priority: 30  # a table as soon as its results exist (it takes a second)
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer tables --only {wildcards.table} --policies {input.policies} --evals {input.evals}"
        " {params.main} {params.profile} {params.serving} --out-dir results/tables > {log} 2>&1"


rule figure:
    input:
        unpack(report_inputs("figure")),
    output:
        png=report("results/figures/{figure}.png", caption="../report/figure.rst", category="Figures"),
        pdf="results/figures/{figure}.pdf",
    params:
        main=f"--main-metric {MAIN_METRIC} --main-threshold {MAIN_T}",
        scaling=scaling_arg,
        profile=profile_arg,
        serving=serving_arg,
        code=lambda w: code_version("figure", w.figure),
    log:
        "logs/figures/{figure}.log",
    priority: 30  # a figure as soon as its results exist
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer figures --only {wildcards.figure} --policies {input.policies} --evals {input.evals}"
        " --distances {input.distances} {params.main} {params.scaling} {params.profile} {params.serving}"
        " --out-dir results/figures"
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


# where the results are, beside Snakemake's own progress line ("N of M steps (x%) done") after every job
onstart:
    print(f"kvsharer: every table is written to results/tables/ (.md, .csv) and every figure to results/figures/ "
          f"(.png, .pdf) as soon as the results it reads exist; the headline first (tables/{HEADLINE['table']}.md, "
          f"figures/{HEADLINE['figure']}.png: PPL vs sharing rate of the paper's order and ours)",
          file=sys.stderr)


onsuccess:
    print("kvsharer: the tables are in results/tables/*.md, the figures in results/figures/*.png", file=sys.stderr)
