"""Rule figure_partitions: iid vs non-iid bars (fedmia.stages.report.report_partitions_figure)."""

from fedmia.logs import setup_logging
from fedmia.stages import report as stage

setup_logging(snakemake.log[0])
stage.report_partitions_figure(
    table=snakemake.input[0],
    options=snakemake.params.options,
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
