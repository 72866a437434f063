"""Rule hypervolume: Table 2 (fedmia.stages.report.report_hypervolume)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import report as stage

setup_logging(snakemake.log[0])
stage.report_hypervolume(
    table=snakemake.input[0],
    front=snakemake.params.front,
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
