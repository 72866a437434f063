"""Rule figure_cell: one cell's rounds or ROC figure (fedmia.stages.report.report_cell_figures)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import report as stage

setup_logging(snakemake.log[0])
stage.report_cell_figures(
    attack_files=list(snakemake.input),
    kind=snakemake.params.kind,
    options=snakemake.params.options,
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
