"""Rule attack: every attack against every target client of a cell (fedmia.pipeline.attack)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.attack(
    measures_file=snakemake.input.mdm,
    partition_file=snakemake.input.partition,
    cell=snakemake.params.cell,
    rounds=snakemake.params.rounds,
    manifest_file=snakemake.input.manifest,
    **snakemake.params.attack,
    outputs=dict(snakemake.output.items()),
)
