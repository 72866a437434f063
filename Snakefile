# fedmia: membership inference attacks and defenses in federated learning.
# Table of contents only; the rules live in workflow/rules/, the code in src/fedmia/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/recording.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/attack.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/oneshot.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
        ONESHOT_OUTPUTS,
