# Datasets: download, verify and convert once into compact arrays under resources/data/.


rule data_prepare:
    output:
        # meta.json is written last: its presence marks a complete dataset folder.
        meta=f"{DATA_ROOT}/{{dataset}}/meta.json",
    params:
        args=data_prepare_args,
        root=lambda wildcards, output: Path(output.meta).parent.parent,
    log:
        "results/logs/data_prepare/{dataset}.log",
    threads: 1
    localrule: True  # compute nodes often have no internet
    conda:
        "../envs/fedsq.yaml"
    shell:
        "python -m fedsq data prepare {params.args} --root {params.root} > {log} 2>&1"
