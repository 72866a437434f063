"""Rule partition: clients' shards and the evaluation set (fedmia.stages.partition.partition)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import partition as stage

setup_logging(snakemake.log[0])
stage.partition(
    dict(snakemake.input.items()),
    snakemake.params.partition,
    int(snakemake.wildcards.seed),
    snakemake.output[0],
    plugins=snakemake.params.plugins,
)
