# The one-shot empirical privacy estimate (privacy.one_shot): each trained cell trained
# again with canary clients. Planned in `all` only when privacy.one_shot.canaries > 0.
ONESHOT = f"results/oneshot/{CELL}.json"


# Every trained cell's one-shot result, or none when privacy.one_shot.canaries is 0 (a
# recorded cell cannot be trained again): planned by `all`.
ONESHOT_OUTPUTS = (
    [
        ONESHOT.format(**dataclasses.asdict(c))
        for c in SPEC.cells
        if c not in SPEC.recorded
    ]
    if config["privacy"]["one_shot"]["canaries"]
    else []
)


rule oneshot:
    input:
        **DATA_FILES,
        partition=PARTITION,
        manifest=f"{TRAIN}/manifest.json",
    output:
        ONESHOT,
    log:
        f"results/logs/oneshot/{CELL}.log",
    benchmark:
        f"results/benchmarks/oneshot/{CELL}.tsv"
    conda:
        "../../envs/fedmia.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        runtime=resources_of("train", "runtime"),
        mem_mb=resources_of("train", "mem_mb"),
    params:
        model=get_model_cfg,
        defense=get_defense_cfg,
        train=get_train_cfg,
        cell=get_cell,
        one_shot=config["privacy"]["one_shot"],
        delta=config["privacy"]["delta"],
        device=config["device"],
        deterministic=config["deterministic"],
        code=code("oneshot"),
        plugins=PLUGINS,
    script:
        "../scripts/oneshot.py"
