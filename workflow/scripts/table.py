"""Rule table: the attack tables (fedmia.pipeline.report_tables)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.report_tables(
    attack_files=list(snakemake.input.attacks),
    manifests=list(snakemake.input.manifests),
    selections=snakemake.params.selections,
    fpr_rule=snakemake.params.fpr_rule,
    outputs=dict(snakemake.output.items()),
)
