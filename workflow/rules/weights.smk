# Pretrained ImageNet-1K weights, fetched once per backbone and verified by SHA-256.


rule weights_fetch:
    output:
        weights=f"{WEIGHTS_DIR}/{{backbone}}_imagenet.pt",
    params:
        args=weights_fetch_args,
    log:
        "results/logs/weights_fetch/{backbone}.log",
    threads: 1
    localrule: True  # compute nodes often have no internet
    conda:
        "../envs/fedsq.yaml"
    shell:
        "python -m fedsq weights fetch {wildcards.backbone} {params.args} --out {output.weights} > {log} 2>&1"
