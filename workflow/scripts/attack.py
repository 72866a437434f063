"""Rule attack: every attack against every target client of a cell (fedmia.stages.attack.attack)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import attack as stage

setup_logging(snakemake.log[0])
stage.attack(
    measures_file=snakemake.input.mdm,
    partition_file=snakemake.input.partition,
    cell=snakemake.params.cell,
    rounds=snakemake.params.rounds,
    manifest_file=snakemake.input.manifest,
    **snakemake.params.attack,
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
