"""fedmia: membership inference attacks and defenses in federated learning.

A Snakemake workflow over this package reproduces *Evaluating Membership Inference
Attacks and Defenses in Federated Learning* (Zhu et al., arXiv 2402.06289). The
package holds the pure computation (datasets, partitions, models, FedAvg, defenses);
:mod:`fedmia.pipeline` is the only module that reads and writes the workflow's files.
"""

__version__ = "0.2.0"
