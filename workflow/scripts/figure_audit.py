"""Rule figure_audit: empirical against accounted ε (fedmia.stages.report)."""

from fedmia.logs import setup_logging
from fedmia.stages import report as stage

setup_logging(snakemake.log[0])
stage.report_audit_figure(
    table=snakemake.input[0],
    options=snakemake.params.options,
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
