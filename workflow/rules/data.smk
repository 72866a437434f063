rule standin:
    output:
        directory(f"{STANDINS}/{{standin}}"),
    log:
        "results/logs/standin/{standin}.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        standin=lambda wildcards: canonical(config["standins"][wildcards.standin]),
        code=code("prepare"),
        plugins=PLUGINS,
    script:
        "../scripts/standin.py"


rule prepare:
    input:
        get_dataset_standin,
    output:
        **DATA_FILES,
    log:
        "results/logs/prepare/{dataset}.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        dataset=get_dataset_cfg,
        code=code("prepare"),
        plugins=PLUGINS,
    script:
        "../scripts/prepare.py"


rule partition:
    input:
        labels=DATA_FILES["labels"],
        is_test=DATA_FILES["is_test"],
    output:
        PARTITION,
    log:
        "results/logs/partition/{dataset}/{partition}/seed{seed}.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        partition=get_partition_cfg,
        code=code("partition"),
        plugins=PLUGINS,
    script:
        "../scripts/partition.py"
