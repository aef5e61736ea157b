# Tables, figures and the HTML report (`snakemake --report report.html`), from every stage's results.

TABLES = ["table1", "order_ablation", "metric_ablation", "threshold_ablation", "acceptance_by_rank", "search_cost"]
FIGURES = ["ppl_vs_rate", "distance_heatmap", "acceptance_vs_rank", "threshold_ablation", "metric_ablation", "passkey"]


def all_evals():
    return eval_files("ppl") + eval_files("harness") + eval_files("longctx")


def final_outputs():
    return expand("results/tables/{table}.{ext}", table=TABLES, ext=["csv", "md"]) + expand(
        "results/figures/{figure}.{ext}", figure=FIGURES, ext=["png", "pdf"]
    )


rule tables:
    input:
        policies=policy_files(),
        evals=all_evals(),
    output:
        csv=[
            report(f"results/tables/{t}.csv", caption=f"../report/table_{t}.rst", category="Tables")
            for t in TABLES
        ],
        md=[f"results/tables/{t}.md" for t in TABLES],
    params:
        main=f"--main-metric {MAIN_METRIC} --main-threshold {MAIN_T}",
    log:
        "logs/tables.log",
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer tables --policies {input.policies} --evals {input.evals} {params.main}"
        " --out-dir results/tables > {log} 2>&1"


rule figures:
    input:
        policies=policy_files(),
        evals=all_evals(),
        distances=distance_files(),
    output:
        png=[
            report(f"results/figures/{f}.png", caption=f"../report/figure_{f}.rst", category="Figures")
            for f in FIGURES
        ],
        pdf=[f"results/figures/{f}.pdf" for f in FIGURES],
    params:
        main=f"--main-metric {MAIN_METRIC} --main-threshold {MAIN_T}",
    log:
        "logs/figures.log",
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer figures --policies {input.policies} --evals {input.evals} --distances {input.distances}"
        " {params.main} --out-dir results/figures > {log} 2>&1"
