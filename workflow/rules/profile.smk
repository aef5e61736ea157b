# Memory and speed vs sharing rate, with and without cache methods (token methods, quantization, MiniCache).


rule profile:
    input:
        model="results/models/{model}",
    output:
        "results/{model}/profile.csv",
    params:
        rates=",".join(str(x) for x in setting("profile/rates", [])),
        methods=lambda w: ",".join(model_methods(w.model, setting("profile/methods"))),
        batches=",".join(str(x) for x in setting("profile/batch_sizes", [])),
        contexts=",".join(str(x) for x in setting("profile/contexts", [])),
        new_tokens=setting("profile/new_tokens"),
        repeats=setting("profile/repeats"),
        # profile.memory_gb is one GPU's: a model spread over N GPUs has N times that for its max-batch rows
        memory=lambda w: (f"--memory-gb {config['profile']['memory_gb'] * max(1, jobs.model_gpus(config, w.model))}"
                          if setting("profile/memory_gb") else ""),
        dtype=lambda w: model_setting(w.model, "dtype"),
    log:
        "logs/{model}/profile.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: 2
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} profile --model {input.model} --name {wildcards.model}"
        " --rates {params.rates} --cache {params.methods} --batch-sizes {params.batches} --contexts {params.contexts}"
        " --new-tokens {params.new_tokens} --repeats {params.repeats} {params.memory} --dtype {params.dtype}"
        " --out {output} > {log} 2>&1"
