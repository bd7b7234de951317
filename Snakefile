# Entry point for `snakemake` run from the repository root; the workflow lives in workflow/.


include: "workflow/Snakefile"


# `include` keeps the including file's default target, so name the workflow's own.
workflow.default_target = "all"
