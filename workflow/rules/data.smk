rule prepare:
    output:
        **DATA_FILES,
    params:
        dataset=get_dataset_cfg,
        version=VERSION,
    log:
        "results/logs/prepare/{dataset}.log",
    script:
        "../scripts/prepare.py"


rule partition:
    input:
        labels=DATA_FILES["labels"],
        is_test=DATA_FILES["is_test"],
    output:
        PARTITION,
    params:
        partition=get_partition_cfg,
        version=VERSION,
    log:
        "results/logs/partition/{dataset}/{partition}/seed{seed}.log",
    script:
        "../scripts/partition.py"
