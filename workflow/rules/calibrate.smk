# The learning-rate pick before FL: each method is calibrated in its own model form
# (DualCopy for fedsq) and with its BatchNorm policy, so no method inherits an lr tuned for another.


rule calibrate:
    input:
        unpack(calibrate_inputs),
    output:
        calibration=CALIBRATION,
    params:
        overrides=calibrate_overrides,
        args=calibrate_args,
    log:
        "results/logs/calibrate/{dataset}/{backbone}/{tuned_on}/bn-{bn}/{method}.log",
    # A sweep gates every FL run of its cell and is the longest job: started first, the FL runs
    # keep both cores busy to the end instead of queueing behind the last sweep.
    priority: 1
    threads: config["resources"]["calibrate"]["threads"]
    resources:
        gpu=config["resources"]["gpu"],
        mem_mb=config["resources"]["calibrate"]["mem_mb"],
        runtime=config["resources"]["calibrate"]["runtime"],
    conda:
        "../envs/fedsq.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m fedsq calibrate --config {input.run_config} {params.overrides}"
        " {params.args} --out {output.calibration} > {log} 2>&1"
