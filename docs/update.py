r"""Copy the figures and tables the README shows from finished runs into docs/.

Every file under docs/ (except this script and docs/README.md) is a copy of a file that
a documented run writes under its working directory's ``results/``; nothing here is
drawn by hand. After the runs the README describes::

    snakemake --cores all -d runs/default
    snakemake --cores all --configfile config/fashion_mnist.yaml -d runs/fashion_mnist
    snakemake --cores all --configfile config/defenses.yaml -d runs/defenses
    snakemake --cores all --configfile config/fashion_mnist_defenses.yaml \\
        -d runs/fashion_mnist_defenses
    snakemake --cores all --configfile config/audit.yaml -d runs/audit
    python examples/flower/run.py && \
        snakemake --cores all --configfile examples/flower/audit.yaml   # in the repo: flower=.

run (any subset of the runs; the others' files are left as they are)::

    python docs/update.py default=runs/default fashion_mnist=runs/fashion_mnist \\
        defenses=runs/defenses fashion_mnist_defenses=runs/fashion_mnist_defenses \\
        audit=runs/audit flower=.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
CELL = "results/figures/{}/alexnet/none/iid/seed0"
#: run name → (file under the run's working directory, name under docs/)
FILES: dict[str, list[tuple[str, str]]] = {
    "default": [(f"{CELL.format('digits')}/rounds.png", "default_rounds_iid.png"),
                ("results/tables/attacks.md", "default_attacks.md"),
                ("results/tables/findings.md", "default_findings.md")],
    "fashion_mnist": [(f"{CELL.format('fashion_mnist')}/rounds.png",
                       "fashion_mnist_rounds_iid.png"),
                      ("results/tables/attacks.md", "fashion_mnist_attacks.md"),
                      ("results/tables/findings.md", "fashion_mnist_findings.md")],
    "defenses": [("results/tables/privacy_utility.csv", "defenses_privacy_utility.csv"),
                 ("results/tables/hypervolume.md", "defenses_hypervolume.md"),
                 ("results/figures/privacy_utility_cos.png",
                  "defenses_privacy_utility_cos.png")],
    "fashion_mnist_defenses": [
        ("results/tables/privacy_utility.csv", "fashion_mnist_defenses_privacy_utility.csv"),
        ("results/tables/hypervolume.md", "fashion_mnist_defenses_hypervolume.md"),
        ("results/figures/privacy_utility_cos.png",
         "fashion_mnist_defenses_privacy_utility_cos.png")],
    "audit": [("results/tables/privacy_utility.csv", "audit_privacy_utility.csv"),
              ("results/figures/privacy_audit.png", "audit_privacy_audit.png")],
    "flower": [("results/tables/attacks.md", "flower_attacks.md")],
}


def main(argv: list[str]) -> int:
    """Copy each named run's files; stop before copying anything if one is missing."""
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        print(f"usage: python docs/update.py NAME=DIR ... (NAME in {sorted(FILES)})",
              file=sys.stderr)
        return 2
    plan = []
    for arg in argv:
        name, _, folder = arg.partition("=")
        if name not in FILES:
            print(f"unknown run '{name}'; choose from {sorted(FILES)}", file=sys.stderr)
            return 2
        for rel, dest in FILES[name]:
            src = Path(folder) / rel
            if not src.is_file():
                print(f"{src} does not exist: finish the '{name}' run in {folder} first",
                      file=sys.stderr)
                return 1
            plan.append((src, DOCS / dest))
    for src, dest in plan:
        shutil.copyfile(src, dest)
        print(f"{dest.relative_to(DOCS.parent)} <- {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
