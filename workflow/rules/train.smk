rule train:
    input:
        **DATA_FILES,
        partition=PARTITION,
    output:
        history=f"{TRAIN}/history.parquet",
        final=f"{TRAIN}/final.safetensors",
        observed=directory(f"{TRAIN}/observed"),
        ownership=f"{TRAIN}/ownership.parquet",
        manifest=f"{TRAIN}/manifest.json",
    log:
        f"results/logs/train/{CELL}.log",
    benchmark:
        f"results/benchmarks/train/{CELL}.tsv"
    conda:
        "../../envs/fedmia.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        runtime=resources_of("train", "runtime"),
        mem_mb=resources_of("train", "mem_mb"),
        # how often the resumable state is saved: an execution setting, not a result's
        # (a resource, so changing it reruns nothing)
        checkpoint_every=config["checkpoint_every"],
    params:
        checkpoint=f"results/checkpoints/{CELL}",
        model=get_model_cfg,
        defense=get_defense_cfg,
        train=get_train_cfg,
        cell=get_cell,
        device=config["device"],
        deterministic=config["deterministic"],
        code=code("train"),
        plugins=PLUGINS,
    script:
        "../scripts/train.py"
