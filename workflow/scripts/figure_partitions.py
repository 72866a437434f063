"""Rule figure_partitions: iid vs non-iid bars (fedmia.pipeline.report_partitions_figure)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.report_partitions_figure(
    table=snakemake.input[0],
    options=snakemake.params.options,
    outputs=dict(snakemake.output.items()),
)
