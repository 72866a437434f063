"""Rule import_recording: a recorded server view as a cell (fedmia.stages.recording)."""

from fedmia.core.contracts import PREPARED_FILES
from fedmia.core.logs import setup_logging
from fedmia.stages import recording as stage

setup_logging(snakemake.log[0])
inputs = dict(snakemake.input.items())
stage.import_recording(
    recording=snakemake.params.folder,
    data={k: inputs[k] for k in PREPARED_FILES},
    model=snakemake.params.model,
    partition=snakemake.params.partition,
    cell=snakemake.params.cell,
    device="cpu",
    threads=snakemake.threads,
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
