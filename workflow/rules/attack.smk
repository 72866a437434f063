rule attack:
    input:
        mdm=MDM,
        partition=PARTITION,
    output:
        ATTACK,
    log:
        f"results/logs/attack/{CELL}/{{attack}}.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        attack=get_attack_params,
        cell=get_cell,
        rounds=get_observed_rounds,
        version=VERSION,
    script:
        "../scripts/attack.py"
