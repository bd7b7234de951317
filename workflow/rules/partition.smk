# Client partitions: one per (dataset, split, seed), shared by every backbone and method.


rule partition:
    input:
        data=f"{DATA_ROOT}/{{dataset}}/meta.json",
    output:
        partition=f"{PARTITION_DIR}/partition.npz",
        class_counts=f"{PARTITION_DIR}/class_counts.csv",
        heatmap=report(
            f"{PARTITION_DIR}/heatmap.png",
            caption="../report/partition_heatmap.rst",
            category="Partitions",
            subcategory="{dataset}",
            labels={"split": "{split}", "seed": "{seed}"},
        ),
    params:
        dataset=lambda wildcards: shlex.quote(DATASETS[wildcards.dataset]),
        data_root=lambda wildcards, input: Path(input.data).parent.parent,
        out=lambda wildcards, output: Path(output.partition).parent,
        args=partition_args(),
    log:
        "results/logs/partition/{dataset}/{split}/seed{seed}.log",
    threads: 1
    localrule: True  # seconds of work: not worth a cluster job
    conda:
        "../envs/fedsq.yaml"
    shell:
        "python -m fedsq partition --dataset {params.dataset} --data-root {params.data_root}"
        " --split {wildcards.split} --seed {wildcards.seed} {params.args}"
        " --out {params.out} > {log} 2>&1"
