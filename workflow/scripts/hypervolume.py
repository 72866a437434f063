"""Rule hypervolume: Table 2 (fedmia.pipeline.report_hypervolume)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.report_hypervolume(
    table=snakemake.input[0], outputs=dict(snakemake.output.items())
)
