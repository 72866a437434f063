"""Rule figure_privacy_utility: one attack family's privacy–utility figure."""

from fedmia.logs import setup_logging
from fedmia.stages import report as stage

setup_logging(snakemake.log[0])
stage.report_privacy_utility_figure(
    table=snakemake.input[0],
    family=snakemake.wildcards.family,
    options=snakemake.params.options,
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
