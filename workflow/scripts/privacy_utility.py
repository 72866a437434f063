"""Rule privacy_utility: attack success next to utility (fedmia.pipeline)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.report_privacy_utility(
    table=snakemake.input.table,
    histories=list(snakemake.input.histories),
    defenses=snakemake.params.defenses,
    output=snakemake.output[0],
)
