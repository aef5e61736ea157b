# Models and text: materialize each model once; split the corpus into calibration / held-out text.


rule prepare_model:
    output:
        directory("results/models/{model}"),
    params:
        source=lambda w: config["models"][w.model]["source"],
        dtype=lambda w: model_setting(w.model, "dtype"),
    log:
        "logs/{model}/prepare_model.log",
    conda:
        "../../envs/kvsharer.yaml"
    threads: lambda w: model_setting(w.model, "threads")
    resources:
        mem_mb=lambda w: model_setting(w.model, "mem_mb"),  # one copy of the weights: converted on CPU
        gpu=0,
    shell:
        "python -m kvsharer --threads {threads} prepare-model --source {params.source:q} --dtype {params.dtype}"
        " --out {output} > {log} 2>&1"


rule prepare_text:
    output:
        calibration="results/text/calibration.txt",
        evaluation="results/text/evaluation.txt",
    params:
        source=config["calibration"]["text"],
        eval_fraction=setting("calibration/eval_fraction"),
    log:
        "logs/prepare_text.log",
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer prepare-text --source {params.source:q} --eval-fraction {params.eval_fraction}"
        " --calibration-out {output.calibration} --evaluation-out {output.evaluation} > {log} 2>&1"


# one-token answers follow the tokenizer of the config's first model (lm-eval then scores a question's
# choices from one forward; for other tokenizers the items stay valid, just not cheaper)
ONE_TOKEN_MODEL = next(iter(config["models"])) if setting("evaluation/harness/one_token_answers", False) else None


rule make_tasks:
    input:
        text="results/text/evaluation.txt",
        tokenizer=[f"results/models/{ONE_TOKEN_MODEL}"] if ONE_TOKEN_MODEL else [],
    output:
        "results/text/tasks/tasks.json",
    params:
        one_token=f"--single-token-words results/models/{ONE_TOKEN_MODEL}" if ONE_TOKEN_MODEL else "",
        passage_words=",".join(str(n) for n in setting("evaluation/harness/passage_words", [])),
        # stand-ins of lm-eval benchmarks (a rehearsal): name=kind,... (kvsharer.evaluate.standin_tasks)
        standins=lambda w: ",".join(f"{n}={k}" for n, k in setting("evaluation/harness/standins", {}).items()),
    log:
        "logs/make_tasks.log",
    priority: 20  # the task jobs (priority 5) wait for it; Snakemake does not pass priorities up to inputs
    conda:
        "../../envs/kvsharer.yaml"
    shell:
        "python -m kvsharer make-tasks --text {input.text} {params.one_token} --passage-words {params.passage_words} --standins '{params.standins}' --out-dir results/text/tasks > {log} 2>&1"
