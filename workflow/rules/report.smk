# Tables, claims and plots over every finished run; `snakemake --report results/report.html`
# bundles the outputs marked with report().


rule report:
    input:
        summaries=run_summaries(),
        class_counts=partition_class_counts(),
    output:
        results=report("results/tables/results.csv", caption="../report/results_table.rst", category="Tables"),
        results_md="results/tables/results.md",
        results_tex="results/tables/results.tex",
        claims=report("results/tables/claims.csv", caption="../report/claims_table.rst", category="Tables"),
        claims_md="results/tables/claims.md",
        val_acc=report("results/plots/val_acc_vs_round.png", caption="../report/val_acc.rst", category="Plots"),
        gate_agreement=report(
            "results/plots/gate_agreement_vs_round.png", caption="../report/gate_agreement.rst", category="Plots"
        ),
        best_acc=report("results/plots/best_acc_bars.png", caption="../report/best_acc.rst", category="Plots"),
        partitions=report("results/plots/partitions.png", caption="../report/partitions.rst", category="Partitions"),
    params:
        runs=lambda wildcards, input: sorted({str(Path(p).parent) for p in input.summaries}),
        partitions=lambda wildcards, input: sorted({str(Path(p).parent) for p in input.class_counts}),
        out=lambda wildcards, output: Path(output.results).parent.parent,
        # How the claims table decides (config `claims`, see config/README.md).
        parity_margin=config["claims"]["parity_margin"],
        flat_points=config["claims"]["flat_points"],
        alpha=config["claims"]["alpha"],
    log:
        "results/logs/report.log",
    threads: 1
    localrule: True  # seconds of work: not worth a cluster job
    conda:
        "../envs/fedsq.yaml"
    shell:
        "python -m fedsq report --runs {params.runs} --partitions {params.partitions} --out {params.out}"
        " --parity-margin {params.parity_margin} --flat-points {params.flat_points} --alpha {params.alpha}"
        " > {log} 2>&1"
