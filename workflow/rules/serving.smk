# vLLM serving Table 1's policies (optional: `serving:` in the config; docs/serving.md): per model, the plain model
# and the searched policies at every KV-cache budget, in the environment that has vLLM.
rule serving:
    input:
        model="results/models/{model}",
        policies=serving_policy_files,
    output:
        "results/{model}/serving.json",
    params:
        python=serving_python,
        policies=serving_policy_args,
        budgets=lambda w: ",".join(fmt(x) for x in setting("serving/kv_cache_mib")),
        block_size=setting("serving/block_size"),
        requests=setting("serving/requests"),
        prompt_tokens=setting("serving/prompt_tokens"),
        new_tokens=setting("serving/new_tokens"),
        max_num_seqs=setting("serving/max_num_seqs"),
        repeats=setting("serving/repeats"),
        eager=lambda w: "--eager" if setting("serving/eager") else "--no-eager",
        interleave=lambda w: "--interleave" if setting("serving/interleave") else "--no-interleave",
        # one engine spreads over the model's GPUs (tensor parallelism); a CPU run has one engine process
        tensor_parallel=lambda w: max(1, jobs.model_gpus(config, w.model)),
        dtype=lambda w: model_setting(w.model, "dtype"),
    log:
        "logs/{model}/serving.log",
    conda:
        "../../envs/serving.yaml"
    threads: setting("serving/threads", 1)
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
    shell:
        # KVSHARER_WORKER emptied: the warm worker (make demo) runs the main environment, which has no vLLM
        "command -v {params.python} > /dev/null || {{ echo 'serving: no interpreter {params.python}: make serve-setup"
        " builds .venv-serve (config serving.python), or run with --use-conda' > {log}; exit 1; }}; "
        "KVSHARER_WORKER= {params.python} -m kvsharer --threads {threads} serving --model {input.model}"
        " --name {wildcards.model} {params.policies} --kv-cache-mib {params.budgets} --block-size {params.block_size}"
        " --requests {params.requests} --prompt-tokens {params.prompt_tokens} --new-tokens {params.new_tokens}"
        " --max-num-seqs {params.max_num_seqs} --repeats {params.repeats} {params.eager} {params.interleave}"
        " --tensor-parallel-size {params.tensor_parallel} --dtype {params.dtype} --out {output} > {log} 2>&1"
