# With aggregate in threat.view the rule also writes the aggregate's measures.
rule measure:
    input:
        **DATA_FILES,
        partition=get_cell_partition,
        observed=get_view("observed"),
        manifest=get_view("manifest.json"),
    output:
        **({"aggregate": MDM_AGGREGATE} if "aggregate" in VIEWS else {}),
        mdm=MDM,
    log:
        f"results/logs/measure/{CELL}.log",
    benchmark:
        f"results/benchmarks/measure/{CELL}.tsv"
    conda:
        "../../envs/fedmia.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        runtime=resources_of("measure", "runtime"),
        mem_mb=resources_of("measure", "mem_mb"),
    params:
        rounds=get_observed_rounds,
        measure=canonical(config["measure"]),
        device=config["device"],
        deterministic=config["deterministic"],
        code=code("measure"),
        plugins=PLUGINS,
    script:
        "../scripts/measure.py"
