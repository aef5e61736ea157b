# Every policy (and the plain model, policy "plain") through the evaluation stages. A setting
# '<policy>+<label>' composes it with a cache method (kvsharer.cache.compose): '--cache <spec>', streamed in chunks.


rule evaluate_ppl:
    input:
        unpack(lambda w: {"model": f"results/models/{w.model}", "text": "results/text/evaluation.txt",
                          "policy": policy_input(w)}),
    output:
        "results/{model}/eval/{policy}/ppl.json",
    params:
        policy=policy_arg,
        cache=chunk_arg,
        max_tokens=setting("evaluation/ppl/max_tokens"),
        window=setting("evaluation/ppl/window"),
        dtype=lambda w: model_setting(w.model, "dtype"),
    log:
        "logs/{model}/eval/{policy}/ppl.log",
    conda:
        "../../envs/kvsharer.yaml"
    priority: lambda w: ppl_priority(w.policy)  # the headline's PPL first, then the order ablation's (common.smk)
    threads: lambda w: model_setting(w.model, "threads")
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
        batch=retry_batch("batch_size"),
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} evaluate-ppl --model {input.model} {params.policy} {params.cache}"
        " --text {input.text} --max-tokens {params.max_tokens} --window {params.window}"
        " --batch-size {resources.batch} --dtype {params.dtype} --out {output} > {log} 2>&1"


rule evaluate_harness:
    input:
        unpack(harness_inputs),
    output:
        "results/{model}/eval/{policy}/harness.json",
    params:
        policy=policy_arg,
        cache=chunk_arg,
        tasks=",".join(setting("evaluation/harness/tasks", [])),
        task_dir="--task-dir results/text/tasks" if setting("evaluation/harness/local_tasks") else "",
        limit=lambda w: f"--limit {setting('evaluation/harness/limit')}" if setting("evaluation/harness/limit") else "",
        fewshot=lambda w: (f"--num-fewshot {setting('evaluation/harness/num_fewshot')}"
                           if setting("evaluation/harness/num_fewshot") is not None else ""),
        dtype=lambda w: model_setting(w.model, "dtype"),
    log:
        "logs/{model}/eval/{policy}/harness.log",
    conda:
        "../../envs/kvsharer.yaml"
    priority: 5  # long jobs first, so that short ones fill the end of the run
    threads: lambda w: model_setting(w.model, "threads")
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
        batch=retry_batch("batch_size", kind="harness"),
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} evaluate-harness --model {input.model} {params.policy} {params.cache}"
        " --tasks {params.tasks} {params.task_dir} {params.limit} {params.fewshot}"
        " --batch-size {resources.batch} --dtype {params.dtype} --out {output} > {log} 2>&1"


rule evaluate_ruler:
    input:
        unpack(lambda w: {"model": f"results/models/{w.model}", "policy": policy_input(w)}),
    output:
        "results/{model}/eval/{policy}/ruler.json",
    params:
        policy=policy_arg,
        cache=chunk_arg,
        tasks=",".join(setting("evaluation/ruler/tasks", [])),
        lengths=ruler_lengths,
        limit=lambda w: f"--limit {setting('evaluation/ruler/limit')}" if setting("evaluation/ruler/limit") else "",
        dtype=lambda w: model_setting(w.model, "dtype"),
    log:
        "logs/{model}/eval/{policy}/ruler.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: lambda w: model_setting(w.model, "threads")
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
        batch=retry_batch("batch_size", kind="ruler"),
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} evaluate-harness --model {input.model} {params.policy} {params.cache}"
        " --tasks {params.tasks} --max-seq-lengths {params.lengths} {params.limit}"
        " --batch-size {resources.batch} --dtype {params.dtype} --out {output} > {log} 2>&1"


rule evaluate_longbench:
    input:
        unpack(harness_inputs),
    output:
        "results/{model}/eval/{policy}/longbench.json",
    params:
        policy=policy_arg,
        cache=chunk_arg,
        tasks=",".join(setting("evaluation/longbench/tasks", [])),
        task_dir="--task-dir results/text/tasks" if setting("evaluation/harness/local_tasks") else "",
        max_length=longbench_length_arg,
        limit=lambda w: f"--limit {setting('evaluation/longbench/limit')}" if setting("evaluation/longbench/limit") else "",
        dtype=lambda w: model_setting(w.model, "dtype"),
    log:
        "logs/{model}/eval/{policy}/longbench.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: lambda w: model_setting(w.model, "threads")
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
        batch=retry_batch("batch_size", kind="longbench"),
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} evaluate-harness --model {input.model} {params.policy} {params.cache}"
        " --tasks {params.tasks} {params.task_dir} {params.max_length} {params.limit}"
        " --batch-size {resources.batch} --dtype {params.dtype} --out {output} > {log} 2>&1"


rule evaluate_longctx:
    input:
        unpack(lambda w: {"model": f"results/models/{w.model}", "text": "results/text/evaluation.txt",
                          "policy": policy_input(w)}),
    output:
        "results/{model}/eval/{policy}/longctx.json",
    params:
        policy=policy_arg,
        cache=cache_arg,
        lengths=longctx_lengths,
        answer_tokens=setting("evaluation/longctx/answer_tokens"),
        depths=",".join(str(x) for x in setting("evaluation/longctx/depths", [])),
        trials=setting("evaluation/longctx/trials"),
        seed=setting("evaluation/longctx/seed"),
        dtype=lambda w: model_setting(w.model, "dtype"),
    log:
        "logs/{model}/eval/{policy}/longctx.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: lambda w: model_setting(w.model, "threads")
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        gpu=model_gpus,
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} evaluate-longctx --model {input.model} {params.policy} {params.cache}"
        " --text {input.text} --lengths {params.lengths} --depths {params.depths} --trials {params.trials}"
        " --seed {params.seed} --max-new-tokens {params.answer_tokens} --dtype {params.dtype} --out {output} > {log} 2>&1"


rule evaluate_ppl_corpus:
    input:
        unpack(lambda w: {"model": f"results/models/{w.model}", "policy": policy_input(w)}),
    output:
        "results/{model}/eval/{policy}/ppl_{corpus}.json",
    params:
        policy=policy_arg,
        cache=chunk_arg,
        text=lambda w: EVAL["ppl"]["corpora"][w.corpus],
        max_tokens=setting("evaluation/ppl/corpus_max_tokens") or setting("evaluation/ppl/max_tokens"),
        window=setting("evaluation/ppl/window"),
        dtype=lambda w: model_setting(w.model, "dtype"),
    log:
        "logs/{model}/eval/{policy}/ppl_{corpus}.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: lambda w: model_setting(w.model, "threads")
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),
        batch=retry_batch("batch_size"),
        gpu=model_gpus,
    shell:
        "python -m kvsharer --threads {threads} --gpus {resources.gpu} evaluate-ppl --model {input.model} {params.policy} {params.cache}"
        " --text {params.text:q} --corpus {wildcards.corpus} --max-tokens {params.max_tokens} --window {params.window}"
        " --batch-size {resources.batch} --dtype {params.dtype} --out {output} > {log} 2>&1"
