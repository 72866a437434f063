"""Rule privacy_utility: attack success next to utility (fedmia.stages.report)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import report as stage

setup_logging(snakemake.log[0])
stage.report_privacy_utility(
    table=snakemake.input.table,
    manifests=list(snakemake.input.manifests),
    audits=list(snakemake.input.audits),
    oneshot=list(snakemake.input.oneshot),
    defenses=snakemake.params.defenses,
    delta=snakemake.params.delta,
    utility=snakemake.params.utility,
    plugins=snakemake.params.plugins,
    output=snakemake.output[0],
)
