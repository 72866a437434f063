"""Rule measure: membership disclosure measures of one cell (fedmia.pipeline.measure)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
inputs = dict(snakemake.input.items())
pipeline.measure(
    data={k: inputs[k] for k in ("images", "labels", "is_test", "meta")},
    partition_file=inputs["partition"],
    observed_dir=inputs["observed"],
    rounds=snakemake.params.rounds,
    manifest_file=inputs["manifest"],
    device=snakemake.params.device,
    threads=snakemake.threads,
    **snakemake.params.measure,
    output=snakemake.output[0],
)
