"""Rule oneshot: a cell trained again with canary clients (fedmia.stages.oneshot.oneshot)."""

from fedmia.core.contracts import PREPARED_FILES
from fedmia.core.logs import setup_logging
from fedmia.stages import oneshot as stage

setup_logging(snakemake.log[0])
inputs = dict(snakemake.input.items())
stage.oneshot(
    data={k: inputs[k] for k in PREPARED_FILES},
    partition_file=inputs["partition"],
    manifest_file=inputs["manifest"],
    model=snakemake.params.model,
    defense=snakemake.params.defense,
    train_cfg=snakemake.params.train,
    cell=snakemake.params.cell,
    one_shot=snakemake.params.one_shot,
    delta=snakemake.params.delta,
    device=snakemake.params.device,
    deterministic=snakemake.params.deterministic,
    threads=snakemake.threads,
    plugins=snakemake.params.plugins,
    output=snakemake.output[0],
)
