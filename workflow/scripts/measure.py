"""Rule measure: membership disclosure measures of one cell (fedmia.stages.measure.measure)."""

from fedmia.core.contracts import PREPARED_FILES
from fedmia.core.logs import setup_logging
from fedmia.stages import measure as stage

setup_logging(snakemake.log[0])
inputs = dict(snakemake.input.items())
stage.measure(
    data={k: inputs[k] for k in PREPARED_FILES},
    partition_file=inputs["partition"],
    observed_dir=inputs["observed"],
    rounds=snakemake.params.rounds,
    manifest_file=inputs["manifest"],
    device=snakemake.params.device,
    deterministic=snakemake.params.deterministic,
    threads=snakemake.threads,
    config=snakemake.params.measure,
    plugins=snakemake.params.plugins,
    output=snakemake.output["mdm"],
    aggregate_output=snakemake.output.get("aggregate"),
)
