"""Rule attack: every attack against every target client of a cell (fedmia.stages.attack.attack)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import attack as stage

setup_logging(snakemake.log[0])
inputs, params = dict(snakemake.input.items()), dict(snakemake.params.items())
stage.attack(
    measures_file=inputs["mdm"],
    partition_file=inputs["partition"],
    cell=params["cell"],
    rounds=params["rounds"],
    manifest_file=inputs["manifest"],
    **params["attack"],
    plugins=params["plugins"],
    views=params.get("views", ["uploads"]),
    aggregate_file=inputs.get("aggregate"),
    outputs=dict(snakemake.output.items()),
)
