rule import_recording:
    input:
        **DATA_FILES,
        # the manifest, not the folder: Snakemake dates a folder by the folder itself
        recording=lambda wildcards: recording_of(wildcards).manifest,
    output:
        manifest=f"{IMPORTED}/manifest.json",
        observed=directory(f"{IMPORTED}/observed"),
        ownership=f"{IMPORTED}/ownership.parquet",
        final=f"{IMPORTED}/final.safetensors",
        partition=f"{IMPORTED}/partition.parquet",
    log:
        f"results/logs/import_recording/{CELL}.log",
    conda:
        "../../envs/fedmia.yaml"
    threads: config["threads"]
    resources:
        runtime=resources_of("train", "runtime"),
        mem_mb=resources_of("train", "mem_mb"),
    params:
        folder=lambda wildcards: recording_of(wildcards).folder,
        # a new recording (its manifest lists every file's hash) reruns the import
        recording_sha256=lambda wildcards: recording_of(wildcards).sha256,
        model=get_model_cfg,
        partition=get_partition_cfg,
        cell=get_cell,
        code=code("recording"),
        plugins=PLUGINS,
    script:
        "../scripts/import_recording.py"
