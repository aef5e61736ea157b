# One policy search per (model, rate, order, metric, threshold, seed). A killed search resumes from its
# journal (results/{model}/policies/<name>.json.journal.jsonl) when the DAG is rerun. A search starts from
# the journal of the same search at the next smaller rate (its candidates are this one's first ones).


rule search:
    input:
        model="results/models/{model}",
        calibration="results/{model}/calibration.safetensors",
        after=previous_policy,
        start=calibration_states,
    output:
        policy="results/{model}/policies/r{rate}_{order}_{metric}_T{threshold}_s{seed}.json",
    params:
        procedure=setting("search/procedure"),
        # the candidate budget bounds the paper's loop at high T; a measured search measures ~3 x layers
        # candidates in its first step by design
        budget=lambda w: (f"--max-candidates {S['max_candidates']}"
                          if S["max_candidates"] and not w.order.startswith("measured") else ""),
        measured=lambda w: (f"--sources {setting('search/measured/sources')} --refresh {setting('search/measured/refresh')}"
                            + (f" --screen {setting('search/measured/screen')}" if setting("search/measured/screen") else "")
                            if w.order.startswith("measured") else ""),
        samples=setting("calibration/samples"),
        tokens=setting("calibration/tokens"),
        dtype=lambda w: model_setting(w.model, "dtype"),
        batch=batch_arg,
        after=after_arg,
        start=lambda w, input: f"--start {input.start}" if input.get("start") else "",
    log:
        "logs/{model}/search/r{rate}_{order}_{metric}_T{threshold}_s{seed}.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: lambda w: model_setting(w.model, "threads")
    priority: search_priority  # the measured searches first, then the others the headline reads (common.smk)
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
        batch=retry_batch(),
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} search --model {input.model} --calibration {input.calibration}"
        " --rate {wildcards.rate} --order {wildcards.order} --metric {wildcards.metric}"
        " --threshold {wildcards.threshold} --seed {wildcards.seed} --procedure {params.procedure} {params.budget} {params.measured} {params.after} {params.start}"
        " --samples {params.samples} --tokens {params.tokens} --dtype {params.dtype} {params.batch} --out {output.policy} > {log} 2>&1"


# The fitted order's search also writes its policy's K/V maps (the policy file names them).
use rule search as search_fitted with:
    output:
        policy="results/{model}/policies/r{rate}_{order,fitted}_{metric}_T{threshold}_s{seed}.json",
        maps="results/{model}/policies/r{rate}_{order,fitted}_{metric}_T{threshold}_s{seed}.kvmaps.safetensors",


ruleorder: search_fitted > search
