# Search cost vs depth and width (random-init Llama shapes), fitted and projected to 7B-405B models;
# candidate counts per shared layer come from the real searches of the config's models.


rule search_scaling:
    input:
        policies=[f"results/{m}/policies/{p}.json" for m in config["models"] for p in main_policies("dissimilar")],
    output:
        "results/scaling/search_scaling.json",
    params:
        layers=",".join(str(x) for x in setting("scaling/layers", [])),
        hidden=",".join(str(x) for x in setting("scaling/hidden", [])),
        samples=setting("scaling/samples"),
        tokens=setting("scaling/tokens"),
        rate=setting("scaling/rate"),
    log:
        "logs/search_scaling.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: jobs.scaling_settings(config)["threads"]
    resources:
        # a CPU measurement: memory of its largest random fp32 model and wall time from its FLOPs (kvsharer.measure.scaling)
        mem_mb=jobs.rule_resources(config, "search_scaling")["mem_mb"] if "scaling" in config else 2000,
        runtime=jobs.rule_resources(config, "search_scaling")["runtime"] if "scaling" in config else 30,
        gpu=0,
    shell:
        "python -m kvsharer --threads {threads} search-scaling --layers {params.layers} --hidden {params.hidden}"
        " --samples {params.samples} --tokens {params.tokens} --rate {params.rate} --policies {input.policies}"
        " --out {output} > {log} 2>&1"
