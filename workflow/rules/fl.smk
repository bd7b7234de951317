# Federated runs: one job per (dataset, backbone, split, method, seed), calibrated lr in
# results/runs/, one common lr in results/control/. summary.json is written last by the
# engine, so a finished run is never repeated and its MLflow run never duplicated; an
# interrupted one resumes from checkpoint.pt (not an output, so Snakemake keeps it) unless
# its inputs or code changed since, and a finished one removes it.


rule run_config:
    output:
        run_config=RUN_CONFIG,
    params:
        run=config["run"],
    log:
        "results/logs/run_config.log",
    threads: 1
    localrule: True
    run:
        Path(output.run_config).write_text(yaml.safe_dump(params.run, sort_keys=False))


rule tracking_init:
    # Creates the MLflow store and experiment once, before parallel runs race to do it.
    output:
        ready=touch(TRACKING_READY),
    params:
        args=tracking_init_args(),
    log:
        "results/logs/tracking_init.log",
    threads: 1
    localrule: True
    conda:
        "../envs/fedsq.yaml"
    shell:
        "python -m fedsq tracking init {params.args} > {log} 2>&1"


rule fl:
    input:
        unpack(fl_inputs),
    output:
        summary=f"{RUN_DIR}/summary.json",
    params:
        overrides=fl_overrides,
        records=fl_record_args,
        out=lambda wildcards, output: Path(output.summary).parent,
    log:
        "results/logs/fl/{run_set}/{dataset}/{backbone}/{split}/{method}/seed{seed}.log",
    threads: config["resources"]["fl"]["threads"]
    resources:
        gpu=config["resources"]["gpu"],
        mem_mb=config["resources"]["fl"]["mem_mb"],
        runtime=config["resources"]["fl"]["runtime"],
    conda:
        "../envs/fedsq.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m fedsq run --config {input.run_config} {params.overrides}"
        " {params.records} --out {params.out} > {log} 2>&1"
