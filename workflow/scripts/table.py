"""Rule table: the attack tables (fedmia.stages.report.report_tables)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import report as stage

setup_logging(snakemake.log[0])
stage.report_tables(
    attack_files=list(snakemake.input.attacks),
    manifests=list(snakemake.input.manifests),
    selections=snakemake.params.selections,
    fpr_rule=snakemake.params.fpr_rule,
    partition_kinds=snakemake.params.partition_kinds,
    table_metrics=snakemake.params.table_metrics,
    replicate_files=list(snakemake.input.replicates),
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
