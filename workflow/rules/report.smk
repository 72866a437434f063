# Report jobs read small tables and draw figures: on a cluster they run where Snakemake
# runs instead of waiting in the queue.
localrules:
    table,
    figure_rounds,
    figure_roc,
    figure_partitions,
    privacy_utility,
    figure_privacy_utility,
    hypervolume,
    figure_audit,
    secure_aggregation,
    all,


rule table:
    input:
        attacks=get_all_attacks,
        manifests=get_all_manifests,
        replicates=get_all_replicates,
    output:
        csv=report(
            "results/tables/attacks.csv",
            caption="../report/attacks_table.rst",
            category="Tables",
        ),
        per_round="results/tables/attacks_per_round.csv",
        md="results/tables/attacks.md",
        tex="results/tables/attacks.tex",
        findings_csv=report(
            "results/tables/findings.csv",
            caption="../report/findings.rst",
            category="Tables",
        ),
        findings_md="results/tables/findings.md",
    log:
        "results/logs/report/table.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        selections=SPEC.selections,
        fpr_rule=config["attack"]["fpr_rule"],
        partition_kinds={k: p["kind"] for k, p in sorted(config["partitions"].items())},
        table_metrics=config["report"]["table_metrics"],
        code=code("report"),
        plugins=PLUGINS,
    script:
        "../scripts/table.py"


rule figure_rounds:
    input:
        get_cell_attacks,
    output:
        png=report(
            f"{FIGURES}/rounds.png",
            caption="../report/rounds.rst",
            category="Figures",
            subcategory="{dataset} {model} {defense} {partition} seed {seed}",
        ),
        pdf=f"{FIGURES}/rounds.pdf",
    log:
        f"results/logs/report/{CELL}/rounds.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        kind="rounds",
        options=get_report_options(),
        code=code("report"),
        plugins=PLUGINS,
    script:
        "../scripts/figure_cell.py"


use rule figure_rounds as figure_roc with:
    output:
        png=report(
            f"{FIGURES}/roc.png",
            caption="../report/roc.rst",
            category="Figures",
            subcategory="{dataset} {model} {defense} {partition} seed {seed}",
        ),
        pdf=f"{FIGURES}/roc.pdf",
    log:
        f"results/logs/report/{CELL}/roc.log",
    params:
        kind="roc",
        options=get_report_options(),
        code=code("report"),
        plugins=PLUGINS,


rule figure_partitions:
    input:
        "results/tables/attacks.csv",
    output:
        png=report(
            "results/figures/partitions.png",
            caption="../report/partitions.rst",
            category="Figures",
        ),
        pdf="results/figures/partitions.pdf",
    log:
        "results/logs/report/partitions.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        kind="partitions",
        options=get_figure_options(),
        code=code("report"),
        plugins=PLUGINS,
    script:
        "../scripts/figure_table.py"


rule privacy_utility:
    input:
        table="results/tables/attacks.csv",
        manifests=get_all_manifests,
        audits=get_all_audits,
        oneshot=get_all_oneshot,
    output:
        report(
            "results/tables/privacy_utility.csv",
            caption="../report/privacy_utility_table.rst",
            category="Tables",
        ),
    log:
        "results/logs/report/privacy_utility.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        defenses=canonical(config["defenses"]),
        delta=config["privacy"]["delta"],
        utility=config["report"]["utility"],
        code=code("report"),
        plugins=PLUGINS,
    script:
        "../scripts/privacy_utility.py"


rule figure_privacy_utility:
    input:
        "results/tables/privacy_utility.csv",
    output:
        png=report(
            "results/figures/privacy_utility_{family}.png",
            caption="../report/privacy_utility.rst",
            category="Figures",
            subcategory="Privacy-utility",
        ),
        pdf="results/figures/privacy_utility_{family}.pdf",
    log:
        "results/logs/report/privacy_utility_{family}.log",
    wildcard_constraints:
        family="|".join(families()),
    conda:
        "../../envs/fedmia.yaml"
    params:
        kind="privacy_utility",
        args=lambda wildcards: {"family": wildcards.family},
        options=get_figure_options(),
        code=code("report"),
        plugins=PLUGINS,
    script:
        "../scripts/figure_table.py"


rule hypervolume:
    input:
        "results/tables/privacy_utility.csv",
    output:
        csv=report(
            "results/tables/hypervolume.csv",
            caption="../report/hypervolume.rst",
            category="Tables",
        ),
        md="results/tables/hypervolume.md",
    log:
        "results/logs/report/hypervolume.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        front=config["report"]["hypervolume_front"],
        code=code("report"),
        plugins=PLUGINS,
    script:
        "../scripts/hypervolume.py"


rule figure_audit:
    input:
        "results/tables/privacy_utility.csv",
    output:
        png=report(
            "results/figures/privacy_audit.png",
            caption="../report/privacy_audit.rst",
            category="Figures",
            subcategory="Privacy-utility",
        ),
        pdf="results/figures/privacy_audit.pdf",
    log:
        "results/logs/report/privacy_audit.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        kind="audit",
        options=get_figure_options(),
        code=code("report"),
        plugins=PLUGINS,
    script:
        "../scripts/figure_table.py"


# Planned only when the config attacks the aggregate view (threat.view; get_final_output).
rule secure_aggregation:
    input:
        "results/tables/attacks.csv",
    output:
        csv=report(
            "results/tables/secure_aggregation.csv",
            caption="../report/secure_aggregation.rst",
            category="Tables",
        ),
        md="results/tables/secure_aggregation.md",
    log:
        "results/logs/report/secure_aggregation.log",
    conda:
        "../../envs/fedmia.yaml"
    params:
        code=code("report"),
        plugins=PLUGINS,
    script:
        "../scripts/secure_aggregation.py"
