# Memory and speed vs sharing rate, with and without cache methods (token methods, quantization, MiniCache).


rule profile:
    input:
        model="results/models/{model}",
    output:
        "results/{model}/profile.csv",
    params:
        rates=",".join(str(x) for x in config.get("profile", {}).get("rates", [0, 0.125, 0.25, 0.375, 0.5])),
        methods=lambda w: ",".join(model_methods(w.model, config.get("profile", {}).get("methods", ["none", "h2o:0.5"]))),
        batches=",".join(str(x) for x in config.get("profile", {}).get("batch_sizes", [1, 4])),
        contexts=",".join(str(x) for x in config.get("profile", {}).get("contexts", [512])),
        new_tokens=config.get("profile", {}).get("new_tokens", 16),
        repeats=config.get("profile", {}).get("repeats", 1),
        # profile.memory_gb is one GPU's: a model spread over N GPUs has N times that for its max-batch rows
        memory=lambda w: (f"--memory-gb {config['profile']['memory_gb'] * max(1, jobs.model_gpus(config, w.model))}"
                          if config.get("profile", {}).get("memory_gb") else ""),
        dtype=lambda w: model_setting(w.model, "dtype", "float32"),
    log:
        "logs/{model}/profile.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb", 4000),
        gpu=model_gpus,
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} profile --model {input.model} --name {wildcards.model}"
        " --rates {params.rates} --cache {params.methods} --batch-sizes {params.batches} --contexts {params.contexts}"
        " --new-tokens {params.new_tokens} --repeats {params.repeats} {params.memory} --dtype {params.dtype}"
        " --out {output} > {log} 2>&1"
