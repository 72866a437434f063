"""Rule prepare: the canonical arrays of one dataset (fedmia.stages.prepare.prepare)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import prepare as stage

setup_logging(snakemake.log[0])
stage.prepare(
    snakemake.params.dataset,
    dict(snakemake.output.items()),
    plugins=snakemake.params.plugins,
)
