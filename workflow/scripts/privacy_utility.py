"""Rule privacy_utility: attack success next to utility (fedmia.pipeline)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.report_privacy_utility(
    table=snakemake.input.table,
    manifests=list(snakemake.input.manifests),
    defenses=snakemake.params.defenses,
    output=snakemake.output[0],
)
