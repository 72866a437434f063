"""Rule figure_cell: one cell's rounds or ROC figure (fedmia.pipeline.report_cell_figures)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.report_cell_figures(
    attack_files=list(snakemake.input),
    kind=snakemake.params.kind,
    options=snakemake.params.options,
    outputs=dict(snakemake.output.items()),
)
