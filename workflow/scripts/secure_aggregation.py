"""Rule secure_aggregation: uploads vs aggregate (fedmia.stages.report)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import report as stage

setup_logging(snakemake.log[0])
stage.report_secure_aggregation(
    table=snakemake.input[0],
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
