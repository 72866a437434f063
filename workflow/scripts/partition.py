"""Rule partition: clients' shards and the evaluation set (fedmia.pipeline.partition)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.partition(
    dict(snakemake.input.items()),
    snakemake.params.partition,
    int(snakemake.wildcards.seed),
    snakemake.output[0],
)
