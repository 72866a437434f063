"""Rule standin: a small image tree in an official layout (fedmia.stages.prepare)."""

from fedmia.core.logs import setup_logging
from fedmia.stages import prepare as stage

setup_logging(snakemake.log[0])
stage.write_standin(standin=snakemake.params.standin, output=snakemake.output[0])
