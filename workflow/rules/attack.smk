rule attack:
    input:
        mdm=MDM,
        partition=get_cell_partition,
        manifest=get_view("manifest.json"),
        # the aggregate view's measures, only with aggregate in threat.view
        **({"aggregate": MDM_AGGREGATE} if "aggregate" in VIEWS else {}),
    output:
        **cell_attack_files(),
        audit=f"results/attacks/{CELL}/audit.parquet",
        replicates=f"results/attacks/{CELL}/replicates.parquet",
    log:
        f"results/logs/attack/{CELL}.log",
    benchmark:
        f"results/benchmarks/attack/{CELL}.tsv"
    conda:
        "../../envs/fedmia.yaml"
    resources:
        runtime=resources_of("attack", "runtime"),
        mem_mb=resources_of("attack", "mem_mb"),
    params:
        attack=get_attack_params,
        cell=get_cell,
        rounds=get_observed_rounds,
        code=code("attack"),
        plugins=PLUGINS,
        # the threat views (the default, uploads alone, leaves the params as before)
        **({"views": VIEWS} if "aggregate" in VIEWS else {}),
    script:
        "../scripts/attack.py"
