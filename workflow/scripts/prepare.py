"""Rule prepare: the canonical arrays of one dataset (fedmia.pipeline.prepare)."""

from fedmia import pipeline
from fedmia.logs import setup_logging

setup_logging(snakemake.log[0])
pipeline.prepare(snakemake.params.dataset, dict(snakemake.output.items()))
