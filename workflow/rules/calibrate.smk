# Calibration once per model (reused by every search), and the layer distance matrices.


rule calibrate:
    input:
        model="results/models/{model}",
        text="results/text/calibration.txt",
    output:
        stats="results/{model}/calibration.safetensors",
        meta="results/{model}/calibration.safetensors.json",
    params:
        samples=setting("calibration/samples"),
        tokens=setting("calibration/tokens"),
        dtype=lambda w: model_setting(w.model, "dtype"),
        batch=batch_arg,
    log:
        "logs/{model}/calibrate.log",
    conda:
        "../../envs/kvsharer.yaml"
    priority: 20  # every search waits for it
    threads: lambda w: model_setting(w.model, "threads")
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
        batch=retry_batch(),
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} calibrate --model {input.model} --text {input.text}"
        " --samples {params.samples} --tokens {params.tokens} --dtype {params.dtype} {params.batch} --out {output.stats} > {log} 2>&1"


# calibration.states: the plain model's run on the calibration samples, layer by layer, which every fast search
# then starts from instead of computing it (one forward saved per search; a large file: see the schema)
rule calibration_states:
    input:
        model="results/models/{model}",
        calibration="results/{model}/calibration.safetensors",
    output:
        "results/{model}/calibration_states.safetensors",
    params:
        dtype=lambda w: model_setting(w.model, "dtype"),
        batch=batch_arg,
    log:
        "logs/{model}/calibration_states.log",
    conda:
        "../../envs/kvsharer.yaml"
    priority: 20  # every search waits for it
    threads: lambda w: model_setting(w.model, "threads")
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
        batch=retry_batch(),
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} calibration-states --model {input.model}"
        " --calibration {input.calibration} --dtype {params.dtype} {params.batch} --out {output} > {log} 2>&1"


rule distances:
    input:
        "results/{model}/calibration.safetensors",
    output:
        "results/{model}/distances/{metric}.json",
    log:
        "logs/{model}/distances_{metric}.log",
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer distances --calibration {input} --metric {wildcards.metric} --out {output} > {log} 2>&1"
