"""Rule figure_privacy_utility: one attack family's privacy–utility figure."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.report_privacy_utility_figure(
    table=snakemake.input[0],
    family=snakemake.wildcards.family,
    options=snakemake.params.options,
    outputs=dict(snakemake.output.items()),
)
