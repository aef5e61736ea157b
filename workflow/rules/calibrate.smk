# Calibration once per model (reused by every search), and the layer distance matrices.


rule calibrate:
    input:
        model="results/models/{model}",
        text="results/text/calibration.txt",
    output:
        stats="results/{model}/calibration.safetensors",
        meta="results/{model}/calibration.safetensors.json",
    params:
        samples=config["calibration"].get("samples", 30),
        tokens=config["calibration"].get("tokens", 64),
        dtype=lambda w: model_setting(w.model, "dtype", "float32"),
        batch=batch_arg,
    log:
        "logs/{model}/calibrate.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: lambda w: model_setting(w.model, "threads", 1)
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb", 4000),
        gpu=model_gpus,
        batch=retry_batch(),
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} calibrate --model {input.model} --text {input.text}"
        " --samples {params.samples} --tokens {params.tokens} --dtype {params.dtype} {params.batch} --out {output.stats} > {log} 2>&1"


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
