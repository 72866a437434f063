# With aggregate in threat.view the rule also reads the aggregate's measures and gets the
# views as a param (the default, uploads alone, leaves its input and params as before).
rule attack:
    input:
        **({"aggregate": MDM_AGGREGATE} if "aggregate" in VIEWS else {}),
        mdm=MDM,
        partition=get_cell_partition,
        manifest=get_view("manifest.json"),
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
        **({"views": VIEWS} if "aggregate" in VIEWS else {}),
        attack=get_attack_params,
        cell=get_cell,
        rounds=get_observed_rounds,
        code=code("attack"),
        plugins=PLUGINS,
    script:
        "../scripts/attack.py"
