"""Rule train: FedAvg for one cell (fedmia.stages.train.train)."""

from fedmia.core.contracts import PREPARED_FILES
from fedmia.core.logs import setup_logging
from fedmia.stages import train as stage

setup_logging(snakemake.log[0])
inputs = dict(snakemake.input.items())
stage.train(
    data={k: inputs[k] for k in PREPARED_FILES},
    partition_file=inputs["partition"],
    model=snakemake.params.model,
    defense=snakemake.params.defense,
    train_cfg=snakemake.params.train,
    cell=snakemake.params.cell,
    device=snakemake.params.device,
    deterministic=snakemake.params.deterministic,
    threads=snakemake.threads,
    checkpoint_dir=snakemake.params.checkpoint,
    checkpoint_every=snakemake.resources.checkpoint_every,
    plugins=snakemake.params.plugins,
    outputs=dict(snakemake.output.items()),
)
