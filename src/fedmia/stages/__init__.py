"""The workflow's stages, one entry module each.

Each module holds the function one ``workflow/scripts/*.py`` calls with the rule's
inputs, outputs and params (tests call them directly without Snakemake). A stage
imports only what it runs, so the fingerprint of its code (:mod:`fedmia.core.fingerprint`,
a param of its rules) changes only when that code does.
"""
