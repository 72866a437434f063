"""Rules figure_partitions, figure_privacy_utility, figure_audit: a figure of one table.

Calls fedmia.stages.report.report_table_figure with the rule's ``kind`` (and ``args``).
"""

from fedmia.core.logs import setup_logging
from fedmia.stages import report as stage

setup_logging(snakemake.log[0])
stage.report_table_figure(
    kind=snakemake.params.kind,
    table=snakemake.input[0],
    options=snakemake.params.options,
    args=getattr(snakemake.params, "args", None),
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
