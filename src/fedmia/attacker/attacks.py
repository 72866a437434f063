"""Membership inference attacks of the server on the measure table (pure compute).

Input is the *measure table* of one cell: long and tidy, one row per
``(round, client_id, sample_id)`` with float columns ``loss, cos, grad_diff,
grad_norm`` (see :mod:`fedmia.attacker.measures`); ``client_id`` is the client whose upload
produced the value, and every client has a row for every evaluation sample in every
observed round. It is pivoted once into float64 arrays R×K×N (rounds × clients ×
samples, each axis sorted), so samples line up by ``sample_id`` whatever the row order.

Membership of target client ``t`` ("mix" protocol): members are the evaluation
samples ``t`` owns; non-members are all other evaluation samples (held-out test
samples and the other clients' samples). ``owner`` is a Series indexed by
``sample_id``: ``-1`` for a held-out sample, ``k >= 0`` for the client that trains on it.

Attacks (:data:`ATTACKS`; score: higher = more likely a member; ``s`` = sign × measure):

* ``single`` (``loss``, ``cos``, ``grad_norm``, ``grad_diff``): ``s`` of the target's
  upload, one score per observed round.
* ``series`` (``loss_series``, ``cos_series``, ``grad_diff_series``): the mean of ``s``
  over the attacked rounds, reported as round ``-1``.
* ``fedmia`` (``fedmia_loss``, ``fedmia_cos``): per round, Φ((s_t − μ)/σ) where μ and
  σ² are the mean and variance of the same sample's ``s`` under the non-target
  clients' uploads (paper Eq. 10 and the official code: ddof 0, σ² + 1e-8;
  :func:`fedmia_cdf`); the mean over the attacked rounds, round ``-1``.
* ``lira`` (``lira_conf``, ``lira_cos``, ``lira_conf_sum``, ``lira_cos_sum``,
  ``lira_conf_cos_sum``): offline LiRA with the non-target clients' uploads as OUT
  references (:func:`fedmia.attacker.calibrated.lira_z`; the OUT Gaussian's variance rule
  and location are options, :class:`fedmia.attacker.calibrated.LiraOptions`); rounds (and,
  for ``lira_conf_cos_sum``, the loss's φ and the cosine) combined by the mean of Φ(z)
  (``combine = "mean"``, the paper's way) or the sum of z (``"sum"``), round ``-1``.
* ``rmia`` (``rmia``, ``rmia_sum``): offline RMIA on p_y with the same references and the
  held-out samples as population, cross-fitted
  (:func:`fedmia.attacker.calibrated.crossfit_rmia`); per-round scores averaged, or the
  per-round log LR summed before the comparison with log γ.
* ``contrast`` (``contrast_loss``, ``contrast_cos``; the aggregate view only): the
  aggregate's ``s`` in the target's attacked rounds against the other attacked rounds,
  mean_In − λ·mean_Out (:func:`participation_contrast`, λ by the sampling:
  :func:`contrast_lambda`), round ``-1``; no score without both kinds of round.

**Threat views and membership levels** (:data:`VIEWS`; the ``view`` and ``membership``
columns of every result). Under ``uploads`` the server sees each participant's upload (all
of the above but ``contrast``); under ``aggregate`` only the aggregate of the round's
updates and who took part (``single``, ``series`` and ``contrast``;
:attr:`AttackSpec.views`). ``client`` membership is the paper's (is the sample the
target's); ``federation`` membership asks whether it is any client's: a pseudo-client
(:data:`FEDERATION_CLIENT`) holds per round the strongest upload's evidence
(:func:`strongest_upload`) or the aggregate's (:func:`aggregate_as_client`), the held-out
samples are the non-members (:func:`federation_owner`), and ``single`` and ``series``
attacks score it (``target`` −1).

An attack's *kind* says how it calibrates and combines; its *signals* (``measure`` and
``sign``, plus ``also`` for a combined attack) say what it reads. Which attacks are
separate and which are options: the statistic and the round combination are separate
attacks (columns of the tables, compared in :data:`FINDINGS`); how LiRA's Gaussian is
estimated and RMIA's ``a`` and γ are options of the stage (``attack.lira``,
``attack.rmia``), the same for every LiRA / RMIA attack of a run.

**Rounds.** Single-round attacks are scored at every observed round (the per-round
figures draw them all); multi-round attacks average over the *attacked* rounds only
(``attack.rounds``; by default the multiples of ``observe_every``, as the paper
attacks rounds 10, 20, …, 300 — a round added through ``observe_rounds``, such as
round 1, is observed but not attacked unless listed).

**Partial participation** (``train.participation``; a cube built with ``partial``): a
round holds the uploads of its participants only (:attr:`MeasureCube.present`). A target
is scored in the rounds it took part in: a single-round attack at those rounds, a
series over its attacked rounds, and FedMIA, LiRA and RMIA over its attacked rounds with
at least 2 other participants, whose uploads are that round's references
(:func:`target_rounds`); ``n_rounds`` says how many rounds a target's score combines,
and a target without such a round has no multi-round row. A client that never took part
has no rows in the table and is no target. At full participation nothing changes.

**Non-member protocols** (:data:`PROTOCOLS`, a column of every result):

* ``aligned`` (fedmia): the same non-member samples for every client and round, so a
  per-sample statistic (a series mean, FedMIA's reference μ, σ) compares one sample
  with itself.
* ``heldout`` (fedmia): ``aligned`` with the held-out samples as the only
  non-members. Another client's sample has its owner's upload, an IN model, among the
  target's references (and the owner's memorisation in every calibration); a held-out
  sample has none: the metric on the held-out non-members alone is the centralized
  attacks' setting.
* ``official`` (the official code, main.py and mia_attack_auto.py): members stay
  aligned, but the non-members are drawn independently for every (client, round):
  non-member *slot* j holds the test samples' draw or client c's draw, permuted
  afresh for the target, for each reference client and for each round. A series
  mean then averages different samples per slot, and FedMIA compares the target's
  sample with other samples under the reference models — this narrows the
  non-member score distribution and inflates TPR at low FPR. Draws are seeded;
  each ``draw`` is one official run (:class:`OfficialProtocol`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.special import ndtr

from fedmia.attacker import calibrated, metrics, uncertainty
from fedmia.attacker.calibrated import (
    COMBINES,
    DEFAULT_LIRA,
    DEFAULT_RMIA,
    LiraOptions,
    RmiaOptions,
)
from fedmia.core.contracts import (
    ATTACK_DTYPES,
    CELL_KEYS,
    CI_METRICS,
    FEDERATION_TARGET,
    MEASURE_DTYPES,
    MEASURE_KEYS,
    MEASURES,
    MEMBERSHIP_LEVELS,
    REPLICATE_COLUMNS,
    REPLICATE_DTYPES,
    REPLICATE_KEYS,
    REPLICATE_METRICS,
    RESULT_COLUMNS,
)
from fedmia.core.registry import Registry

log = logging.getLogger(__name__)

#: The fix of a damaged measure table, appended to its errors.
REMEASURE = "; rerun the measure stage (snakemake --forcerun measure)"
#: ``round`` of a score that uses all attacked rounds.
MULTI_ROUND = -1
#: FedMIA's variance floor: σ² = var + VAR_FLOOR, as the official code (``var + 1e-8``).
VAR_FLOOR = calibrated.VAR_FLOOR
#: FedMIA's outlier filter keeps reference values below μ + OUTLIER_Z·σ.
OUTLIER_Z = 3.0
#: Policies of FedMIA's outlier filter (:func:`outlier_filter_for`).
OUTLIER_POLICIES = ("auto", "always", "never")
#: How an attack combines rounds and clients (:attr:`AttackSpec.kind`).
ATTACK_KINDS = ("single", "series", "fedmia", "lira", "rmia", "contrast")
#: The kinds calibrated by LiRA or RMIA: they take ``combine`` (``mean`` or ``sum``).
CALIBRATED_KINDS = ("lira", "rmia")
#: Spawn key of the official protocol's random draws (see :func:`official_slots`).
STREAM_OFFICIAL = 3
#: The last key of the seed of RMIA's cross-fitting coins (:func:`rmia_halves`).
RMIA_HALVES = "rmia halves"
#: ``attack`` of the audit row whose attack was chosen on held-out canaries.
SELECTED = "selected"


@dataclass(frozen=True)
class AttackSpec:
    """One attack: which measure, its orientation, and how rounds and clients combine.

    Attributes:
        name: code name (registry key).
        measure: column of the measure table.
        sign: +1 or −1, so that ``sign × measure`` is higher for members.
        kind: ``single`` (one score per round), ``series`` (mean over the attacked
            rounds), ``fedmia`` (per-sample Gaussian CDF against the non-target
            clients, mean over the attacked rounds), ``lira``, ``rmia`` (calibrated on
            the other clients' uploads) or ``contrast`` (the aggregate view: the
            aggregate's statistic in the target's rounds against the others,
            :func:`participation_contrast`).
        family: the measure family of the privacy–utility figures (``loss``, ``cos``,
            ``grad``).
        paper: the paper's names, (v1, v3) — the 2025 version renamed some; empty for
            fedmia's own additions.
        outlier_filter_non_iid: whether ``attack.fedmia_outlier_filter: auto`` applies
            FedMIA's 3σ filter to it on non-iid partitions (the official code does for
            FedMIA-II, the cosine).
        combine: how a ``lira`` or ``rmia`` attack combines rounds (and measures):
            ``mean`` of the per-round scores (the paper's way) or ``sum`` of the per-round
            statistics (z; log LR), :data:`fedmia.attacker.calibrated.COMBINES`. Other
            kinds: ``mean``.
        also: further ``(measure, sign)`` signals a ``lira`` attack combines with the
            first (their z are summed, or their Φ(z) averaged, with the rounds').
    """

    name: str
    measure: str
    sign: int
    kind: Literal["single", "series", "fedmia", "lira", "rmia", "contrast"]
    family: str
    paper: tuple[str, str] = ("", "")
    outlier_filter_non_iid: bool = False
    combine: Literal["mean", "sum"] = "mean"
    also: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        numeric = [c for c, t in MEASURE_DTYPES.items() if c not in MEASURE_KEYS and t != "bool"]
        for measure, sign in self.signals:
            if measure not in numeric:
                raise ValueError(
                    f"attack '{self.name}': measure '{measure}' is not a column "
                    f"of the measure table; choose from {numeric}"
                )
            if sign not in (1, -1) or self.kind not in ATTACK_KINDS:
                raise ValueError(
                    f"attack '{self.name}': sign must be +1 or -1 and kind one "
                    f"of {list(ATTACK_KINDS)} (got {sign}, '{self.kind}')"
                )
        if self.combine not in COMBINES or (
            self.combine != "mean" and self.kind not in CALIBRATED_KINDS
        ):
            raise ValueError(
                f"attack '{self.name}': combine must be one of {list(COMBINES)}, "
                f"and 'mean' unless the kind is one of {list(CALIBRATED_KINDS)} "
                f"(got '{self.combine}' with kind '{self.kind}')"
            )
        if self.also and self.kind != "lira":
            raise ValueError(
                f"attack '{self.name}': only a 'lira' attack combines further "
                f"signals (also); kind is '{self.kind}'"
            )
        if self.kind == "rmia" and (self.measure, self.sign) != ("loss", -1):
            raise ValueError(
                f"attack '{self.name}': RMIA's signal is log p_y = −loss: give "
                f"measure='loss', sign=-1 (got '{self.measure}', {self.sign}); "
                "RMIA on another measure (the cosine) is not defined"
            )

    @property
    def signals(self) -> tuple[tuple[str, int], ...]:
        """``(measure, sign)`` of every signal the attack reads: the first, then ``also``."""
        return ((self.measure, self.sign), *self.also)

    @property
    def measures(self) -> tuple[str, ...]:
        """The measure columns the attack reads."""
        return tuple(dict.fromkeys(m for m, _ in self.signals))

    @property
    def views(self) -> tuple[str, ...]:
        """The threat views (:data:`VIEWS`) the attack applies under, a fact of its kind.

        ``single`` and ``series`` read one upload at a time: every view (under the
        aggregate view the aggregate is the one "upload", federation level). ``fedmia``,
        ``lira`` and ``rmia`` calibrate on the other clients' uploads: the views that show
        each upload (``per_client``). ``contrast`` needs only the aggregate and who took
        part: the views that do not show the uploads.
        """
        names = VIEWS.registered()
        if self.kind in ("single", "series"):
            return tuple(names)
        per_client = self.kind != "contrast"
        return tuple(v for v in names if VIEWS.get(v).per_client == per_client)

    @property
    def multi_round(self) -> bool:
        """Whether the attack combines rounds (one score, ``round = -1``)."""
        return self.kind != "single"

    @property
    def label(self) -> str:
        """Name for tables and legends: ``v1 (v3)``, ``v1`` when both agree, else the code name."""
        v1, v3 = self.paper
        if not v1:
            return self.name
        return v1 if v1 == v3 else f"{v1} ({v3})"


#: The attacks (``attack.attacks``), in table order (registration order): the paper's
#: Table 1 columns, then fedmia's additions, then those of plugins. Registered as facts,
#: ``ATTACKS.register(name, measure=..., sign=..., kind=..., family=..., paper=...)``.
ATTACKS: Registry[AttackSpec] = Registry("attack", build=AttackSpec, decorates=False)

ATTACKS.register(
    "loss", measure="loss", sign=-1, kind="single", family="loss", paper=("Loss-I", "Blackbox-Loss")
)
ATTACKS.register(
    "loss_series",
    measure="loss",
    sign=-1,
    kind="series",
    family="loss",
    paper=("Loss-II", "Loss-Series"),
)
ATTACKS.register(
    "fedmia_loss",
    measure="loss",
    sign=-1,
    kind="fedmia",
    family="loss",
    paper=("Loss-III", "FedMIA-I"),
)
ATTACKS.register(
    "cos", measure="cos", sign=+1, kind="single", family="cos", paper=("Cos-I", "Grad-Cosine")
)
ATTACKS.register(
    "cos_series",
    measure="cos",
    sign=+1,
    kind="series",
    family="cos",
    paper=("Cos-II", "Avg-Cosine"),
)
ATTACKS.register(
    "fedmia_cos",
    measure="cos",
    sign=+1,
    kind="fedmia",
    family="cos",
    paper=("Cos-III", "FedMIA-II"),
    outlier_filter_non_iid=True,
)
ATTACKS.register(
    "grad_norm",
    measure="grad_norm",
    sign=-1,
    kind="single",
    family="grad",
    paper=("Grad-Norm", "Grad-Norm"),
)
ATTACKS.register(
    "grad_diff",
    measure="grad_diff",
    sign=+1,
    kind="single",
    family="grad",
    paper=("Grad-Diff", "Grad-Diff"),
)
ATTACKS.register("grad_diff_series", measure="grad_diff", sign=+1, kind="series", family="grad")
# fedmia's calibrated attacks (module docstring): not in a measure family's
# privacy–utility figure, where only :data:`UTILITY_ATTACK` stands beside the paper's
ATTACKS.register("lira_conf", measure="logit_conf", sign=+1, kind="lira", family="")
ATTACKS.register("lira_cos", measure="cos", sign=+1, kind="lira", family="")
ATTACKS.register(
    "lira_conf_sum", measure="logit_conf", sign=+1, kind="lira", family="", combine="sum"
)
ATTACKS.register("lira_cos_sum", measure="cos", sign=+1, kind="lira", family="", combine="sum")
ATTACKS.register(
    "lira_conf_cos_sum",
    measure="logit_conf",
    sign=+1,
    kind="lira",
    family="",
    combine="sum",
    also=(("cos", +1),),
)
ATTACKS.register("rmia", measure="loss", sign=-1, kind="rmia", family="")
ATTACKS.register("rmia_sum", measure="loss", sign=-1, kind="rmia", family="", combine="sum")
# the aggregate view's client-level attacks (issue 22): in no figure of the paper's families
ATTACKS.register("contrast_loss", measure="loss", sign=-1, kind="contrast", family="")
ATTACKS.register("contrast_cos", measure="cos", sign=+1, kind="contrast", family="")

#: The one attack beside the paper's in every privacy–utility figure, named before the
#: runs (not a per-cell maximum): the combined LiRA of φ and the cosine, summed over rounds.
UTILITY_ATTACK = "lira_conf_cos_sum"


def attack_order() -> list[str]:
    """The registered attacks in table order, i.e. registration order.

    The paper's Table 1 columns, then fedmia's additions, then those of plugins.
    """
    return ATTACKS.registered()


def attacks_for_views(attacks: Sequence[str] | None, views: Iterable[str]) -> list[str]:
    """The attacks of a run under ``views`` (:attr:`AttackSpec.views`).

    ``None`` (the default list): every registered attack that applies under one of the
    views. A listed attack that applies under none of them is an error.

    Raises:
        ValueError: naming the attacks, the views they apply under and the fix.
    """
    views = set(views)
    if attacks is None:
        return [a for a in attack_order() if views & set(ATTACKS.get(a).views)]
    idle = [a for a in attacks if not views & set(ATTACKS.get(a).views)]
    if idle:
        raise ValueError(
            f"{idle} apply under none of the views {sorted(views)} (they apply "
            f"under {sorted({v for a in idle for v in ATTACKS.get(a).views})}): add the view "
            "to threat.view or drop them from attack.attacks"
        )
    return list(attacks)


def single_round_attacks() -> list[str]:
    """The registered single-round attacks, in table order."""
    return [a for a in attack_order() if not ATTACKS.get(a).multi_round]


def families() -> dict[str, list[str]]:
    """Measure family → its registered attacks (table order): one privacy–utility figure each.

    Attacks of family ``""`` are in none (fedmia's calibrated attacks; the figures draw
    :data:`UTILITY_ATTACK` beside every family's).
    """
    out: dict[str, list[str]] = {}
    for a in attack_order():
        if ATTACKS.get(a).family:
            out.setdefault(ATTACKS.get(a).family, []).append(a)
    return out


@dataclass(frozen=True)
class Protocol:
    """A non-member protocol (see the module docstring).

    Attributes:
        name: its name, the ``protocol`` column of every result.
        text: what it means, for the tables' captions.
        redrawn: non-members redrawn per (client, round) as the official code
            (:func:`official_slots`, ``attack.official.draws`` draws); else aligned
            (:func:`aligned_slots`), one draw.
        heldout_only: the held-out samples are the only non-members (aligned only).
    """

    name: str
    text: str
    redrawn: bool = False
    heldout_only: bool = False


#: The non-member protocols (``attack.protocol``).
PROTOCOLS: Registry[Protocol] = Registry("non-member protocol", build=Protocol, decorates=False)
PROTOCOLS.register(
    "aligned", text="non-members aligned: the same samples for every client and round (fedmia)"
)
PROTOCOLS.register(
    "official", redrawn=True, text="non-members redrawn per client and round, as the official code"
)
PROTOCOLS.register(
    "heldout",
    heldout_only=True,
    text="aligned, held-out non-members only: no reference client trained on a non-member (fedmia)",
)


@dataclass(frozen=True)
class View:
    """What the attacking server sees of a round (``threat.view``; module docstring).

    Attributes:
        name: its name, the ``view`` column of every result.
        text: what it means, for the tables' captions.
        per_client: the attacker sees each participant's upload (``uploads``, the paper's
            server); else only the global model, the (weighted) aggregate of the
            participants' updates and who took part (``aggregate``: secure aggregation,
            and what every participant sees of the others).
    """

    name: str
    text: str
    per_client: bool


#: The threat views (``threat.view``): the same training attacked as the paper's server
#: (each upload) and behind secure aggregation (the aggregate alone).
VIEWS: Registry[View] = Registry("threat view", build=View, decorates=False)
VIEWS.register(
    "uploads",
    per_client=True,
    text="the server sees each participant's upload (the paper's threat model)",
)
VIEWS.register(
    "aggregate",
    per_client=False,
    text=(
        "secure aggregation: the server sees the global model, the aggregate of the "
        "participants' updates and who took part, never an individual upload"
    ),
)


@dataclass(frozen=True)
class Finding:
    """A pre-specified comparison of two attacks: the better one should score higher.

    Attributes:
        name: its name (registry key).
        claim: the claim it tests, as the tables state it.
        better: the attack the claim says is stronger.
        worse: the attack it is compared with (paired: same targets and samples).
    """

    name: str
    claim: str
    better: str
    worse: str


#: The findings the report tests (:func:`fedmia.report.findings.findings.findings`), in order: the
#: paper's, per measure family — multi-round beats single-round (II vs I), the other
#: clients' models help (III vs II, III vs I).
FINDINGS: Registry[Finding] = Registry("finding", build=Finding, decorates=False)
for _family in ("loss", "cos"):
    FINDINGS.register(
        f"{_family}: II vs I",
        claim="multi-round beats single-round (II vs I)",
        better=f"{_family}_series",
        worse=_family,
    )
    FINDINGS.register(
        f"{_family}: III vs II",
        claim="other clients' models help (III vs II)",
        better=f"fedmia_{_family}",
        worse=f"{_family}_series",
    )
    FINDINGS.register(
        f"{_family}: III vs I",
        claim="other clients' models help (III vs I)",
        better=f"fedmia_{_family}",
        worse=_family,
    )
# fedmia's, pre-specified before any run of the calibrated attacks (issue 20). "The best of
# the paper's eight" is named, not picked on results: FedMIA-II (Cos-III), the strongest
# attack of the paper's headline table (v3 Table 1, IID: TPR@0.1% 66.98 %); Cos-II, the
# strongest without the other clients' models, beside it.
FINDINGS.register(
    "LiRA-φ vs FedMIA-I",
    better="lira_conf",
    worse="fedmia_loss",
    claim="LiRA's φ and shrunk variance beat FedMIA's loss Gaussian (LiRA-φ vs FedMIA-I)",
)
FINDINGS.register(
    "LiRA-cos vs FedMIA-II",
    better="lira_cos",
    worse="fedmia_cos",
    claim="LiRA's shrunk variance beats FedMIA's on the cosine (LiRA-cos vs FedMIA-II)",
)
FINDINGS.register(
    "sum vs mean of rounds",
    better="lira_conf_sum",
    worse="lira_conf",
    claim="summing per-round z beats averaging Φ(z) (LiRA-φ, Σz vs mean)",
)
FINDINGS.register(
    "RMIA vs FedMIA-I",
    better="rmia_sum",
    worse="fedmia_loss",
    claim="RMIA with a population beats FedMIA-I (RMIA-Σ vs FedMIA-I)",
)
FINDINGS.register(
    "combined vs FedMIA-II",
    better="lira_conf_cos_sum",
    worse="fedmia_cos",
    claim="φ and cosine combined beat the paper's best, FedMIA-II (named before the runs)",
)
FINDINGS.register(
    "combined vs Cos-II",
    better="lira_conf_cos_sum",
    worse="cos_series",
    claim="φ and cosine combined beat Cos-II",
)


def finding_pairs() -> list[tuple[str, str, str]]:
    """``(claim, better attack, worse attack)`` of every registered finding, in order."""
    return [(f.claim, f.better, f.worse) for f in map(FINDINGS.get, FINDINGS.registered())]


def finding_attacks() -> list[str]:
    """The attacks the findings compare (table order): those whose replicates are kept."""
    named = {a for _, better, worse in finding_pairs() for a in (better, worse)}
    return [a for a in attack_order() if a in named]


@dataclass(frozen=True)
class MeasureCube:
    """The measure table as dense arrays.

    Attributes:
        rounds: int64 R, sorted observed rounds.
        clients: int64 K, sorted client ids.
        sample_ids: int64 N, sorted evaluation sample ids.
        values: measure name → float64 R×K×N; ``values[m][r, k, i]`` is measure ``m`` of
            sample ``sample_ids[i]`` under client ``clients[k]``'s upload at ``rounds[r]``
            (NaN where the client did not take part).
        present: bool R×K, which client took part in which round (partial participation);
            ``None``: every client in every round (the full grid).
    """

    rounds: np.ndarray
    clients: np.ndarray
    sample_ids: np.ndarray
    values: Mapping[str, np.ndarray]
    present: np.ndarray | None = None

    @classmethod
    def from_frame(
        cls, mdm: pd.DataFrame, measures: Sequence[str] = MEASURES, *, partial: bool = False
    ) -> MeasureCube:
        """Pivot a measure table after checking columns, duplicates, finiteness and the grid.

        Args:
            mdm: the measure table.
            measures: the measure columns to pivot.
            partial: a round may lack clients (partial participation): a (round, client)
                either has every sample or none, and :attr:`present` says which. Else
                every client needs every sample in every round.

        Raises:
            ValueError: naming the problem (see :func:`validate_measures`).
        """
        missing = [c for c in (*MEASURE_KEYS, *measures) if c not in mdm.columns]
        if missing:
            raise ValueError(
                f"measure table lacks column(s) {missing}; it has {list(mdm.columns)}{REMEASURE}"
            )
        if len(mdm) == 0:
            raise ValueError(f"measure table is empty{REMEASURE}")
        for c in MEASURE_KEYS:
            if not pd.api.types.is_integer_dtype(mdm[c]):
                raise ValueError(f"measure table column '{c}' must be integer, not {mdm[c].dtype}")
        r, c, s = (mdm[k].to_numpy(np.int64) for k in MEASURE_KEYS)
        order = np.lexsort((s, c, r))
        r, c, s = r[order], c[order], s[order]
        dup = (r[1:] == r[:-1]) & (c[1:] == c[:-1]) & (s[1:] == s[:-1])
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            raise ValueError(
                f"measure table has {int(dup.sum())} duplicated (round, client_id, "
                f"sample_id) row(s), e.g. ({r[i]}, {c[i]}, {s[i]}){REMEASURE}"
            )
        rounds, clients, sample_ids = np.unique(r), np.unique(c), np.unique(s)
        shape = (len(rounds), len(clients), len(sample_ids))
        present = None
        if partial:
            ri, ci = np.searchsorted(rounds, r), np.searchsorted(clients, c)
            present = np.zeros(shape[:2], dtype=bool)
            present[ri, ci] = True
            if len(r) != present.sum() * shape[2]:
                raise ValueError(_grid_gaps(mdm, clients, sample_ids, partial=True))
            if present.all():
                present = None  # every client took part in every round
        elif len(r) != np.prod(shape):
            raise ValueError(_grid_gaps(mdm, clients, sample_ids))
        values = {}
        for m in measures:
            v = mdm[m].to_numpy(np.float64)[order]
            bad = ~np.isfinite(v)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"measure column '{m}' has {int(bad.sum())} NaN or infinite "
                    f"value(s), e.g. at round {r[i]}, client {c[i]}, "
                    f"sample_id {s[i]}{REMEASURE}"
                )
            if present is None:
                values[m] = v.reshape(shape)
            else:
                full = np.full(shape, np.nan)
                full[ri, ci, np.searchsorted(sample_ids, s)] = v
                values[m] = full
        return cls(rounds, clients, sample_ids, values, present)

    def client_index(self, client: int) -> int:
        """Position of ``client`` on the client axis; ValueError if the table lacks it."""
        i = int(np.searchsorted(self.clients, client))
        if i == len(self.clients) or self.clients[i] != client:
            raise ValueError(
                f"target client {client} has no rows in the measure table "
                f"(clients: {self.clients.tolist()})"
            )
        return i


def _grid_gaps(
    mdm: pd.DataFrame,
    clients: np.ndarray,
    sample_ids: np.ndarray,
    limit: int = 5,
    partial: bool = False,
) -> str:
    """Describe the missing cells of a duplicate-free, incomplete grid.

    ``partial``: a round may lack clients (they did not take part); only a client's
    missing samples are gaps.
    """
    problems = []
    for rnd, g in mdm.groupby("round", sort=True):
        lacking = np.setdiff1d(clients, g["client_id"].to_numpy())
        if len(lacking) and not partial:
            problems.append(f"round {rnd} lacks client(s) {lacking.tolist()}")
        for cl, gc in g.groupby("client_id", sort=True):
            miss = np.setdiff1d(sample_ids, gc["sample_id"].to_numpy())
            if len(miss):
                problems.append(
                    f"round {rnd}, client {cl} lacks {len(miss)} of "
                    f"{len(sample_ids)} samples (e.g. sample_id {miss[0]})"
                )
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    need = (
        "every participant needs every sample in its rounds"
        if partial
        else "every client needs every sample in every round"
    )
    return f"incomplete measure table ({need}): " + "; ".join(problems[:limit]) + more + REMEASURE


def owner_array(cube: MeasureCube, owner: pd.Series) -> np.ndarray:
    """Owning client of each sample of ``cube`` (int64 N, −1 = held out), checked.

    Raises:
        ValueError: ``owner`` has duplicated sample ids or lacks samples of the table.
    """
    if owner.index.has_duplicates:
        dups = owner.index[owner.index.duplicated()]
        raise ValueError(f"owner has {len(dups)} duplicated sample_id(s), e.g. {dups[0]}")
    known = np.isin(cube.sample_ids, owner.index.to_numpy())
    if not known.all():
        raise ValueError(
            f"{int((~known).sum())} sample(s) of the measure table are not in "
            f"owner, e.g. sample_id {cube.sample_ids[~known][0]}: the measures "
            "belong to another evaluation set; rerun the measure stage on this "
            "partition (or rerun the partition stage)"
        )
    return owner.reindex(cube.sample_ids).to_numpy().astype(np.int64)


def _check_targets(
    cube: MeasureCube, own: np.ndarray, targets: Iterable[int], clients: np.ndarray | None = None
) -> list[int]:
    """The targets, checked: clients of the table (or of ``clients``), with members and not all."""
    out = []
    n = len(own)
    for t in targets:
        if clients is None:
            cube.client_index(t)
        elif t not in set(clients.tolist()):
            raise ValueError(
                f"target client {t} is not among the clients who took part ({clients.tolist()})"
            )
        is_member = own == t
        if not is_member.any():
            raise ValueError(
                f"target client {t} owns none of the {n} evaluation samples "
                "(no members); raise the partition's eval_members_per_client or "
                "drop it from attack.targets"
            )
        if is_member.all():
            raise ValueError(
                f"target client {t} owns all {n} evaluation samples "
                "(no non-members); raise the partition's eval_nonmembers"
            )
        out.append(int(t))
    return out


def _check(
    mdm: pd.DataFrame,
    owner: pd.Series,
    targets: Iterable[int] | None,
    measures: Sequence[str],
    partial: bool = False,
) -> tuple[MeasureCube, np.ndarray, list[int]]:
    cube = MeasureCube.from_frame(mdm, measures, partial=partial)
    own = owner_array(cube, owner)
    targets = cube.clients.tolist() if targets is None else list(targets)
    if partial:
        unseen = [t for t in targets if t not in set(cube.clients.tolist())]
        if unseen:
            log.info("client(s) %s took part in no measured round: not attacked", unseen)
        targets = [t for t in targets if t not in unseen]
    return cube, own, _check_targets(cube, own, targets)


def _check_participants(
    mdm: pd.DataFrame,
    owner: pd.Series,
    targets: Iterable[int] | None,
    measures: Sequence[str],
    participants: pd.DataFrame,
) -> tuple[MeasureCube, np.ndarray, list[int], np.ndarray]:
    """The aggregate's cube, the owners, the checked targets and who took part (bool R×K).

    ``participants`` (:func:`run_attacks_with_replicates`) is reindexed to the cube's rounds;
    the default targets are the clients that took part in a round.
    """
    cube = MeasureCube.from_frame(mdm, measures)
    if len(cube.clients) != 1:
        raise ValueError(
            "the contrast attacks read the aggregate view's measure table, one client_id "
            f"(the aggregate); this one has {cube.clients.tolist()}"
        )
    clients = participants.columns.to_numpy()
    if not (np.issubdtype(clients.dtype, np.integer) and (np.diff(clients) > 0).all()):
        raise ValueError(f"participants' columns must be sorted client ids; got {list(clients)}")
    lacking = sorted(set(cube.rounds.tolist()) - set(participants.index.tolist()))
    if lacking:
        raise ValueError(
            f"participants lacks round(s) {lacking} of the aggregate's measure table: who "
            "took part comes from the same cell's uploads' measure table" + REMEASURE
        )
    present = participants.reindex(index=cube.rounds).to_numpy(bool)
    own = owner_array(cube, owner)
    took = clients[present.any(axis=0)]
    targets = took.tolist() if targets is None else list(targets)
    return cube, own, _check_targets(cube, own, targets, clients), present


def _check_level(
    specs: Sequence[AttackSpec],
    view: str,
    membership: str,
    participants: pd.DataFrame | None,
) -> None:
    """Every attack applies under ``view`` at ``membership``; ``participants`` iff contrast."""
    if view not in VIEWS or membership not in MEMBERSHIP_LEVELS:
        raise ValueError(
            f"unknown view {view!r} or membership level {membership!r}; choose from "
            f"{VIEWS.registered()} and {list(MEMBERSHIP_LEVELS)}"
        )
    wrong = [s.name for s in specs if view not in s.views]
    if wrong:
        raise ValueError(f"attack(s) {wrong} do not apply under the {view!r} view")
    if membership == "federation":
        wrong = [s.name for s in specs if s.kind not in ("single", "series")]
        if wrong:
            raise ValueError(
                f"attack(s) {wrong} have no federation level (single and series attacks only)"
            )
    contrast = [s.name for s in specs if s.kind == "contrast"]
    if (participants is None) == bool(contrast) or (contrast and len(contrast) != len(specs)):
        raise ValueError(
            "contrast attacks (and they only) need participants, who took part in each "
            f"round; got attacks {[s.name for s in specs]} with"
            f"{'out' if participants is None else ''} participants"
        )


#: ``client_id`` of the one pseudo-client of a federation-level table
#: (:func:`strongest_upload`, :func:`aggregate_as_client`); its target is
#: :data:`fedmia.core.contracts.FEDERATION_TARGET` in the results.
FEDERATION_CLIENT = 0


def federation_owner(owner: pd.Series) -> pd.Series:
    """``owner`` at the federation level: any client's sample is the pseudo-client's.

    :data:`FEDERATION_CLIENT` for a sample some client trains on, −1 for a held-out one.
    """
    own = owner.to_numpy()
    return pd.Series(np.where(own >= 0, FEDERATION_CLIENT, -1), index=owner.index)


def strongest_upload(
    mdm: pd.DataFrame, signals: Iterable[tuple[str, int]], *, partial: bool = False
) -> pd.DataFrame:
    """The uploads view's federation-level table: per round the strongest upload's evidence.

    The server tests every upload and keeps the strongest: per (round, sample) and signal,
    ``sign × max_k (sign × measure_k)`` over the round's participants k (NaN-aware: only
    those that took part), so that ``sign × measure`` of the one pseudo-client
    (:data:`FEDERATION_CLIENT`) is the largest over the uploads.

    Args:
        mdm: the uploads' measure table.
        signals: ``(measure, sign)`` pairs, one sign per measure.
        partial: a round may lack clients (:meth:`MeasureCube.from_frame`).

    Returns:
        A measure table (the keys and the signals' measures), one row per (round with a
        participant, sample), ``client_id`` :data:`FEDERATION_CLIENT`.

    Raises:
        ValueError: a measure with both signs; as :meth:`MeasureCube.from_frame`.
    """
    sign = dict(signals)
    both = sorted({m for m, sg in signals if sg != sign[m]})
    if both:
        raise ValueError(f"measure(s) {both} with both signs: build one table per sign")
    cube = MeasureCube.from_frame(mdm, sorted(sign), partial=partial)
    r, n = len(cube.rounds), len(cube.sample_ids)
    out = {
        "round": np.repeat(cube.rounds, n).astype(MEASURE_DTYPES["round"]),
        "client_id": np.full(r * n, FEDERATION_CLIENT, dtype=MEASURE_DTYPES["client_id"]),
        "sample_id": np.tile(cube.sample_ids, r),
    }
    for m, sg in sign.items():
        with np.errstate(invalid="ignore"):
            out[m] = sg * np.nanmax(sg * cube.values[m], axis=1).reshape(-1)
    return pd.DataFrame(out)


def aggregate_as_client(aggregate: pd.DataFrame) -> pd.DataFrame:
    """The aggregate view's measure table as the federation level's pseudo-client's.

    ``client_id`` :data:`FEDERATION_CLIENT` instead of
    :data:`fedmia.core.contracts.AGGREGATE_CLIENT`; the values as they are.
    """
    return aggregate.assign(
        client_id=np.full(len(aggregate), FEDERATION_CLIENT, dtype=aggregate["client_id"].dtype)
    )


def validate_measures(
    mdm: pd.DataFrame,
    owner: pd.Series,
    targets: Iterable[int] | None = None,
    *,
    measures: Sequence[str] = MEASURES,
) -> None:
    """Check a measure table and ownership before an attack.

    Args:
        mdm: the measure table (columns ``round, client_id, sample_id`` and ``measures``).
        owner: owning client of each sample, indexed by ``sample_id`` (−1 = held out).
        targets: target clients (default: every client in the table).
        measures: the measure columns that must be present and finite.

    Raises:
        ValueError: with a message naming the problem: missing columns; non-integer keys;
            duplicated ``(round, client_id, sample_id)`` rows (how many, one example); an
            incomplete grid (which round lacks which client, which client lacks samples);
            NaN or inf in a measure column (which, how many); samples ``owner`` does not
            know; a target absent from the table, or with no members or no non-members.
    """
    _check(mdm, owner, targets, measures)


# ------------------------------------------------------------------------------ FedMIA


def fedmia_cdf(
    target: np.ndarray,
    reference: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    ddof: int = 0,
    outlier_filter: bool = False,
    var_floor: float = VAR_FLOOR,
) -> np.ndarray:
    """FedMIA's per-sample score Φ((s_t − μ)/σ) against the non-target clients (Eq. 10).

    μ and σ² are the mean and variance (``ddof`` 0, as the paper and the official code;
    1 as an option) of the M reference values of each sample, and σ² gets
    ``var_floor`` added, as the official ``var(axis=0) + 1e-8``.

    Args:
        target: float (..., S), the score ``s_t`` under the target's upload.
        reference: float (..., M, S), the same slots' scores under M >= 2 non-target
            uploads.
        weights: optional bool (..., M, S): which reference values count (the official
            protocol's ``self_mix = false`` leaves a reference client's own members
            out); default all.
        ddof: 0 or 1.
        outlier_filter: as the official code for non-iid cosine: keep only reference
            values strictly below μ + 3σ (σ of the same ``ddof``, no floor), recompute
            μ, σ² from them; where none is kept, the smallest value alone
            (σ² = 0 + floor).
        var_floor: added to every variance.

    Returns:
        float64 (..., S) in [0, 1].
    """
    if reference.shape[-2] < 2:
        raise ValueError(
            f"FedMIA needs at least 2 non-target clients; got "
            f"{reference.shape[-2]}: use num_clients >= 3 or drop the fedmia "
            "attacks"
        )
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1; got {ddof}")
    w = (
        np.ones(reference.shape, dtype=bool)
        if weights is None
        else np.broadcast_to(weights, reference.shape)
    )
    if not w.any(axis=-2).all():
        raise ValueError("every slot needs at least one reference value")
    mu, var = calibrated.moments(reference, w, ddof)
    if outlier_filter:
        keep = w & (reference < (mu + OUTLIER_Z * np.sqrt(var))[..., None, :])
        empty = ~keep.any(axis=-2)
        if empty.any():
            lowest = np.argmin(np.where(w, reference, np.inf), axis=-2)
            only = np.arange(reference.shape[-2])[:, None] == lowest[..., None, :]
            keep = np.where(empty[..., None, :], only, keep)
        mu, var = calibrated.moments(reference, keep, ddof)
    return ndtr((target - mu) / np.sqrt(var + var_floor))


def outlier_filter_for(policy: str, attack: str, partition_kind: str) -> bool:
    """Whether FedMIA's outlier filter applies: ``always``, ``never``, or ``auto``.

    ``auto`` applies it as the official code does: to an attack registered with
    ``outlier_filter_non_iid`` (``fedmia_cos``) on non-iid partitions only.
    """
    if policy not in OUTLIER_POLICIES:
        raise ValueError(
            f"unknown outlier-filter policy '{policy}'; choose from {list(OUTLIER_POLICIES)}"
        )
    if policy == "auto":
        return ATTACKS.get(attack).outlier_filter_non_iid and partition_kind != "iid"
    return policy == "always"


# -------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class OfficialProtocol:
    """The official code's non-member draws (see the module docstring).

    Attributes:
        draws: how many independent official runs to score (≥ 1); an official TPR is
            one random draw, so the spread over draws is reported.
        test_slots: held-out samples per (client, round) draw; ``None``: all of the
            evaluation set's held-out samples (the official CIFAR-100 run draws 1,000 of
            10,000, Dermnet 4,000).
        client_slots: samples drawn per (client, round) from each non-target client's
            evaluation samples; ``None``: all of them (the official: 1,000 of 5,000 on
            CIFAR-100, 300 on Dermnet).
        self_mix: the official quirk: a reference client's draw from "each other client"
            includes its own block, so it scores its own members as non-member slots.
            ``False`` leaves a reference client out of the slots of its own block.
        seed: the cell's seed (draws are seeded by ``(seed, target, draw)``).
    """

    draws: int = 5
    test_slots: int | None = None
    client_slots: int | None = None
    self_mix: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Slots:
    """What one protocol draw shows the attacker for one target.

    ``S = P + Q`` slots: the P members (aligned), then Q non-member slots.

    Attributes:
        index: int64 R×K×S (or S for ``aligned``): sample position (on the cube's N axis)
            that client k scores in slot s at round r.
        is_member: bool S.
        group: int64 S, the owner group a slot is drawn from: the target for a member,
            −1 for a held-out sample's slot, ``c`` for a slot of client c's samples (the
            strata of the bootstrap, :func:`bootstrap_strata`).
        ref_weights: bool R×K×S or ``None`` (every non-target client counts).
    """

    index: np.ndarray
    is_member: np.ndarray
    group: np.ndarray
    ref_weights: np.ndarray | None = None


def aligned_slots(own: np.ndarray, target: int, *, heldout_only: bool = False) -> Slots:
    """The aligned protocol: every client scores every evaluation sample in every round.

    With ``heldout_only`` (the ``heldout`` protocol) the slots are the target's members
    and the held-out samples only, in sample order.
    """
    index = np.flatnonzero((own == target) | (own == -1)) if heldout_only else np.arange(len(own))
    return Slots(index, own[index] == target, np.asarray(own[index], dtype=np.int64))


def protocol_slots(
    protocol: str,
    own: np.ndarray,
    target: int,
    num_rounds: int,
    clients: np.ndarray,
    official: OfficialProtocol,
    draw: int,
) -> Slots:
    """The slots of one draw of ``protocol`` (:data:`PROTOCOLS`) for ``target``."""
    p = PROTOCOLS.get(protocol)
    if p.redrawn:
        return official_slots(own, target, num_rounds, clients, official, draw)
    return aligned_slots(own, target, heldout_only=p.heldout_only)


def rmia_halves(slots: Slots, keys: Sequence[str | int]) -> np.ndarray:
    """RMIA's cross-fitting coins of one draw's slots (bool S), seeded by ``keys``.

    One fair coin per slot from ``stable_seed(*keys, "rmia halves")``
    (:func:`fedmia.attacker.calibrated.crossfit_halves`): it depends on the keys and the
    number of slots only, never on which slots are members.
    """
    return calibrated.crossfit_halves(
        len(slots.is_member), uncertainty.stable_seed(*keys, RMIA_HALVES)
    )


def bootstrap_strata(slots: Slots, keys: Sequence[str | int]) -> list[uncertainty.Stratum]:
    """The strata of the bootstrap of one target's rows: one per owner group.

    The slots of each group (:attr:`Slots.group`, in slot order) form a stratum whose
    draws are seeded by ``stable_seed(*keys, group, size)``: with ``keys`` naming the
    cell and the protocol but neither the target nor the official draw, every target's
    rows (and every draw's) resample a group with the same draw. Under ``aligned`` a
    slot is a sample, so the resample is one multiplicity per evaluation sample, shared
    by all targets (a sample's weight is the same where it is a member and where it is
    a non-member). Under ``official`` the members are samples too, the same in every
    draw, so their resample is shared by the draws as it must be (a mean over draws
    would otherwise shrink the members' sampling noise); a non-member slot, however,
    holds another sample in every (round, client) and draw, so there the positions of
    each slot group are resampled, one draw per (group, size) — positions, not
    samples, are shared, and the sampling noise of the held-out pool, common to all
    targets and draws, is not represented: an official row's interval is a valid
    bootstrap of its slots, but a mean over targets or draws of official replicates
    understates the pool's share of the uncertainty (small for the AUC, whose noise
    the few members dominate; larger for TPR at low FPR).
    """
    groups, sizes = np.unique(slots.group, return_counts=True)
    return [
        uncertainty.Stratum(
            uncertainty.stable_seed(*keys, int(g), int(n)), np.flatnonzero(slots.group == g)
        )
        for g, n in zip(groups, sizes, strict=True)
    ]


def official_slots(
    own: np.ndarray,
    target: int,
    num_rounds: int,
    clients: np.ndarray,
    protocol: OfficialProtocol,
    draw: int,
) -> Slots:
    """One official draw for ``target``: non-member slots redrawn per (client, round).

    The non-member slots are grouped as the official code builds them: first
    ``test_slots`` held-out samples, then ``client_slots`` from each other client in
    id order. In every (round, client) each group's slots get an independent
    uniformly random draw without replacement from the group (a random permutation
    when the slots take the whole group). Members stay aligned.
    """
    groups = [np.flatnonzero(own == -1)] + [
        np.flatnonzero(own == c) for c in clients if c != target
    ]
    owners = [-1] + [int(c) for c in clients if c != target]
    sizes = [protocol.test_slots, *[protocol.client_slots] * (len(groups) - 1)]
    rng = np.random.default_rng(
        np.random.SeedSequence([STREAM_OFFICIAL, protocol.seed, target, draw])
    )
    k = len(clients)
    blocks, slot_owner = [], []
    for g, size, o in zip(groups, sizes, owners, strict=True):
        n = len(g) if size is None else size
        if n > len(g):
            raise ValueError(
                f"the official protocol draws {n} slots from "
                f"{'the held-out samples' if o < 0 else f'client {o}'} but the "
                f"evaluation set holds only {len(g)}; lower attack.official."
                f"{'test_slots' if o < 0 else 'client_slots'} or enlarge the "
                "partition's evaluation set"
            )
        if n == 0 or len(g) == 0:
            continue
        pick = rng.random((num_rounds, k, len(g))).argsort(axis=-1)[..., :n]  # R×K×n
        blocks.append(g[pick])
        slot_owner.append(np.full(n, o))
    members = np.flatnonzero(own == target)
    index = np.concatenate(
        [np.broadcast_to(members, (num_rounds, k, len(members))), *blocks], axis=-1
    )
    owner_of_slot = np.concatenate([np.full(len(members), target), *slot_owner])
    is_member = np.arange(index.shape[-1]) < len(members)
    weights = None
    if not protocol.self_mix:
        weights = np.broadcast_to(
            owner_of_slot[None, None, :] != clients[None, :, None], index.shape
        )
    return Slots(index, is_member, owner_of_slot.astype(np.int64), weights)


# ----------------------------------------------------------------------------- scoring


def _slot_values(values: np.ndarray, slots: Slots) -> np.ndarray:
    """R×K×S scores of every client in every slot (``values``: R×K×N)."""
    if slots.index.ndim == 1:
        return values[..., slots.index]
    return np.take_along_axis(values, slots.index, axis=-1)


def participation_contrast(values: np.ndarray, took_part: np.ndarray, lam: float) -> np.ndarray:
    """The contrast of a per-round statistic between a client's rounds and the others.

    c = mean_{r: took_part[r]} values[r] − λ · mean_{r: not took_part[r]} values[r]

    With the other clients' updates fixed, a statistic linear in the aggregate
    A_r = Σ_{k∈S_r} a_k Δ_k has the other clients' expected contribution cancelled when λ is
    P(j∈S | t∈S) / P(j∈S | t∉S) (:func:`contrast_lambda`), so that the contrast of the
    aggregates themselves is the client's own term a_t Δ_t — exactly on a balanced design
    (every m-of-K subset once, λ = (m−1)/m; every subset once, λ = 1).

    Args:
        values: float (R, ...): per round, the statistic: the aggregate vectors (R×P) or
            the aggregate's signed measure of every slot (R×S).
        took_part: bool R, whether the client took part in the round (In) or not (Out).
        lam: λ.

    Returns:
        float64 (...): the contrast.

    Raises:
        ValueError: ``took_part`` not of length R, or no In or no Out round.
    """
    values = np.asarray(values, dtype=np.float64)
    took = np.asarray(took_part, dtype=bool)
    if took.shape != values.shape[:1]:
        raise ValueError(
            f"took_part has shape {took.shape}, but values has {values.shape[0]} rounds"
        )
    if took.all() or not took.any():
        raise ValueError(
            "the participation contrast needs rounds the client took part in and rounds it "
            f"did not; it took part in {int(took.sum())} of {len(took)}"
        )
    return values[took].mean(axis=0) - lam * values[~took].mean(axis=0)


def contrast_lambda(sampling: str, size: int) -> float:
    """λ of :func:`participation_contrast` for a client's rounds drawn by ``sampling``.

    λ = P(j∈S | t∈S) / P(j∈S | t∉S) for another client j: ``uniform`` sampling of
    m = ``size`` of K clients, ((m−1)/(K−1)) / (m/(K−1)) = (m−1)/m; ``poisson`` (every client
    independently), 1.

    Raises:
        ValueError: another sampling, or ``size`` below 1.
    """
    if sampling == "poisson":
        return 1.0
    if sampling != "uniform" or size < 1:
        raise ValueError(
            f"the participation contrast knows uniform (size m >= 1) and poisson sampling; "
            f"got {sampling!r} with size {size}"
        )
    return (size - 1) / size


#: The fewest other participants a round needs to give a target its references (FedMIA,
#: LiRA, RMIA) under partial participation.
MIN_REFERENCES = 2


def target_rounds(
    kind: str, t: int, attacked: np.ndarray, present: np.ndarray | None
) -> np.ndarray:
    """Bool R: the rounds a multi-round attack of ``kind`` combines for client position ``t``.

    Full participation (``present`` ``None``): the attacked rounds. Else the attacked
    rounds the target took part in, and for the kinds with references (``fedmia``,
    ``lira``, ``rmia``) only those with at least :data:`MIN_REFERENCES` other
    participants (``present``: bool R×K, :attr:`MeasureCube.present`).

    ``contrast``: every attacked round, those the target took part in (In) and the others
    (Out), if there is at least one of each; else none (at full participation no round is
    Out: no contrast score).
    """
    if kind == "contrast":
        took = np.zeros(len(attacked), dtype=bool) if present is None else present[:, t]
        if not (attacked & took).any() or not (attacked & ~took).any():
            return np.zeros(len(attacked), dtype=bool)
        return attacked.copy()
    if present is None:
        return attacked
    used = attacked & present[:, t]
    if kind in ("fedmia", *CALIBRATED_KINDS):
        used &= np.delete(present, t, axis=1).sum(axis=1) >= MIN_REFERENCES
    return used


def score_slots(
    spec: AttackSpec,
    xs: Sequence[np.ndarray],
    t: int,
    attacked: np.ndarray,
    *,
    ref_weights: np.ndarray | None = None,
    ddof: int = 0,
    outlier_filter: bool = False,
    lira: LiraOptions = DEFAULT_LIRA,
    rmia: RmiaOptions = DEFAULT_RMIA,
    population: np.ndarray | None = None,
    halves: np.ndarray | None = None,
    present: np.ndarray | None = None,
    memo: dict[tuple, np.ndarray] | None = None,
    lam: float = 1.0,
) -> np.ndarray:
    """Scores of attack ``spec`` against client position ``t``.

    Args:
        spec: the attack.
        xs: per signal of ``spec.signals``, float64 R×K×S, ``sign × measure`` of every
            client in every slot; for a ``contrast`` attack R×1×S, the aggregate's (the
            aggregate view shows no upload).
        t: the target's position on the client axis.
        attacked: bool R, the rounds multi-round attacks combine.
        ref_weights: bool R×K×S, which reference values the calibrated kinds use
            (default all).
        ddof: FedMIA's variance ddof.
        outlier_filter: FedMIA's outlier filter.
        lira: LiRA's options (``lira`` kind).
        rmia: RMIA's ``a`` and γ (``rmia`` kind).
        population: bool S, the slots RMIA may take as population (held-out samples).
        halves: bool S, RMIA's cross-fitting coins (:func:`rmia_halves`).
        present: bool R×K, who took part in which round (partial participation; ``None``:
            everyone): multi-round attacks combine the rounds of :func:`target_rounds`
            (at least one: the caller skips a target without), with that round's other
            participants as references.
        memo: a dict shared by the calls for one target and one set of slots (the same
            ``xs`` per signal, ``t``, ``attacked``, weights and options): LiRA's per-round z
            of a signal and RMIA's per-round log LR are computed once there and reused by
            every attack that reads them (``lira_conf``, ``lira_conf_sum`` and
            ``lira_conf_cos_sum`` share φ's z). ``None``: nothing kept.
        lam: λ of a ``contrast`` attack (:func:`participation_contrast`,
            :func:`contrast_lambda`); ``present`` is then who took part (R×K, the real
            clients; ``t`` a position on its client axis), required.

    Returns:
        ``single``: R×S (one row per observed round; NaN where the target did not take
        part); otherwise 1×S.
    """

    def once(key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if memo is None:
            return compute()
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    x = xs[0]
    if spec.kind == "single":
        return x[:, t]
    a = np.flatnonzero(target_rounds(spec.kind, t, attacked, present))
    if spec.kind == "contrast":
        if present is None:
            raise ValueError(
                f"attack '{spec.name}' (contrast) needs who took part in each round (present)"
            )
        return participation_contrast(x[a, 0], present[a, t], lam)[None]
    if spec.kind == "series":
        return x[a, t].mean(axis=0, keepdims=True)
    others = np.delete(np.arange(x.shape[1]), t)
    w = None if ref_weights is None else ref_weights[a][:, others]
    if present is not None:  # the round's other participants are its references
        seen = np.broadcast_to(present[a][:, others][..., None], (len(a), len(others), x.shape[-1]))
        w = seen if w is None else w & seen
    if spec.kind == "fedmia":
        cdf = fedmia_cdf(
            x[a, t], x[a][:, others], weights=w, ddof=ddof, outlier_filter=outlier_filter
        )
        return cdf.mean(axis=0, keepdims=True)
    if spec.kind == "lira":
        zs = [
            once(
                ("lira", *signal),
                lambda v=v: calibrated.lira_z(v[a, t], v[a][:, others], weights=w, options=lira),
            )
            for signal, v in zip(spec.signals, xs, strict=True)
        ]
        if spec.combine == "sum":  # Σ over rounds and signals
            per = [z.sum(axis=0) for z in zs]
            return (per[0] if len(per) == 1 else np.sum(per, axis=0))[None]
        per = [ndtr(z).mean(axis=0) for z in zs]  # the mean of Φ(z) over rounds and signals
        return (per[0] if len(per) == 1 else np.mean(per, axis=0))[None]
    if population is None or halves is None:
        raise ValueError(f"attack '{spec.name}' (RMIA) needs a population and cross-fitting halves")
    llr = once(  # R'×S
        ("rmia", *spec.signals[0]),
        lambda: calibrated.rmia_log_lr(x[a, t], x[a][:, others], weights=w, a=rmia.a),
    )
    if spec.combine == "sum":
        return calibrated.crossfit_rmia(llr.sum(axis=0), population, halves, rmia.gamma)[None]
    return np.mean(
        [calibrated.crossfit_rmia(r, population, halves, rmia.gamma) for r in llr], axis=0
    )[None]


def attacked_mask(cube: MeasureCube, attack_rounds: Iterable[int] | None) -> np.ndarray:
    """Bool R: which rounds of ``cube`` are attacked (``None``: all); ValueError for others."""
    if attack_rounds is None:
        return np.ones(len(cube.rounds), dtype=bool)
    want = sorted(set(int(r) for r in attack_rounds))
    missing = sorted(set(want) - set(cube.rounds.tolist()))
    if missing:
        raise ValueError(
            f"attack rounds {missing} are not in the measure table (observed "
            f"rounds: {cube.rounds.tolist()}); attack only observed rounds"
        )
    return np.isin(cube.rounds, want)  # empty: no multi-round score (e.g. a diverged run)


def attack_scores(
    name: str | AttackSpec,
    mdm: pd.DataFrame | MeasureCube,
    target: int,
    *,
    attack_rounds: Iterable[int] | None = None,
    ddof: int = 0,
    outlier_filter: bool = False,
    lira: LiraOptions = DEFAULT_LIRA,
    rmia: RmiaOptions = DEFAULT_RMIA,
    owner: pd.Series | None = None,
    bootstrap_keys: Sequence[str | int] = (0,),
) -> pd.DataFrame:
    """Scores of attack ``name`` against target client ``target`` (aligned protocol).

    Args:
        name: attack name (:data:`ATTACKS`), or an :class:`AttackSpec`.
        mdm: the measure table, or its :class:`MeasureCube`.
        target: the target client id.
        attack_rounds: the rounds multi-round attacks combine (default: all in the table).
        ddof: FedMIA's variance ddof (0 as the paper).
        outlier_filter: FedMIA attacks drop reference outliers (ignored by others).
        lira: LiRA's options.
        rmia: RMIA's options.
        owner: owning client of each sample, indexed by ``sample_id`` (−1 = held out):
            RMIA's population (needed by RMIA attacks only).
        bootstrap_keys: the run's keys in the seed of RMIA's cross-fitting coins, as
            :func:`run_attacks` takes them (its default: ``(0,)``, the official seed).

    Returns:
        Columns ``round`` (int64; −1 = a multi-round score), ``sample_id`` (int64),
        ``score`` (float64, higher = more likely a member); one row per (round, sample),
        sorted by round (per-round ones first), then sample_id.
    """
    spec = name if isinstance(name, AttackSpec) else ATTACKS.get(name)
    if spec.kind == "contrast":
        raise ValueError(
            f"attack '{spec.name}' (contrast) scores the aggregate view with who took part: "
            "run it with run_attacks_with_replicates(..., participants=...)"
        )
    cube = mdm if isinstance(mdm, MeasureCube) else MeasureCube.from_frame(mdm, list(spec.measures))
    t = cube.client_index(target)
    xs = [sign * cube.values[m] for m, sign in spec.signals]
    population = halves = None
    if spec.kind == "rmia":
        if owner is None:
            raise ValueError(
                f"attack '{spec.name}' (RMIA) needs owner: its population is the held-out samples"
            )
        slots = aligned_slots(owner_array(cube, owner), target)
        population = slots.group == -1
        halves = rmia_halves(slots, (*bootstrap_keys, "aligned", 0, target))
    attacked = attacked_mask(cube, attack_rounds)
    rounds = cube.rounds if spec.kind == "single" else np.array([MULTI_ROUND])
    if spec.kind != "single" and not target_rounds(spec.kind, t, attacked, cube.present).any():
        rounds = rounds[:0]  # no round to combine for this target
        scores = np.zeros((0, len(cube.sample_ids)))
    else:
        scores = score_slots(
            spec,
            xs,
            t,
            attacked,
            ddof=ddof,
            outlier_filter=outlier_filter,
            lira=lira,
            rmia=rmia,
            population=population,
            halves=halves,
            present=cube.present,
        )
    if spec.kind == "single" and cube.present is not None:  # the target's rounds only
        scores, rounds = scores[cube.present[:, t]], rounds[cube.present[:, t]]
    n = len(cube.sample_ids)
    return pd.DataFrame(
        {
            "round": np.repeat(rounds.astype(np.int64), n),
            "sample_id": np.tile(cube.sample_ids, len(rounds)),
            "score": scores.reshape(-1),
        }
    )


def _intervals(
    scores: np.ndarray,
    slots: Slots,
    strata: Sequence[uncertainty.Stratum],
    rocs: Sequence[Any],
    *,
    n_boot: int,
    rule: str,
) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
    """Per row of ``scores`` (R×S): bootstrap interval, SE and false positives.

    The 95 % percentile interval and the standard error of each
    :data:`fedmia.core.contracts.CI_METRICS` from ``n_boot`` replicates of the stratified
    resample ``strata`` (one resample for all rows: paired), and for each TPR the false
    positives it rests on (from ``rocs``, each row's :func:`fedmia.attacker.metrics.
    roc_counts`). Returns the rows' columns and the replicates (metric → float64 R×B;
    empty without replicates).
    """
    nan = float("nan")
    out: list[dict[str, float]] = [{} for _ in range(len(scores))]
    reps = (
        uncertainty.stratified_replicates(scores, slots.is_member, strata, n_boot=n_boot, rule=rule)
        if n_boot > 0
        else {}
    )
    for m in CI_METRICS:
        for r, row in enumerate(out):
            v = reps[m][r] if m in reps else None
            defined = v is not None and not np.isnan(v).all()
            lo, hi = uncertainty.percentile_interval(v) if defined else (nan, nan)
            row.update(
                {
                    f"{m}_ci_low": lo,
                    f"{m}_ci_high": hi,
                    f"{m}_se": float(np.nanstd(v, ddof=1)) if defined else nan,
                }
            )
    for alpha in metrics.FPR_LEVELS:
        name = metrics.tpr_metric_name(alpha)
        for r, row in enumerate(out):
            row[f"{name}_fp"] = uncertainty.false_positives_of(rocs[r], alpha, rule)
    return out, reps


def run_attacks(
    names: Sequence[str],
    mdm: pd.DataFrame,
    owner: pd.Series,
    targets: Iterable[int] | None = None,
    **options: Any,
) -> dict[str, pd.DataFrame]:
    """Run attacks against each target client under each protocol and measure success.

    :func:`run_attacks_with_replicates` without keeping replicates: its result tables
    (the same keyword options).
    """
    return run_attacks_with_replicates(names, mdm, owner, targets, **options)[0]


def run_attacks_with_replicates(
    names: Sequence[str],
    mdm: pd.DataFrame,
    owner: pd.Series,
    targets: Iterable[int] | None = None,
    *,
    attack_rounds: Iterable[int] | None = None,
    protocols: Sequence[str] | None = None,
    official: OfficialProtocol = OfficialProtocol(),
    ddof: int = 0,
    outlier_filter: Mapping[str, bool] | None = None,
    lira: LiraOptions = DEFAULT_LIRA,
    rmia: RmiaOptions = DEFAULT_RMIA,
    fpr_rule: str = "at_most",
    roc_points: int = 200,
    n_boot: int = 1000,
    bootstrap_keys: Sequence[str | int] | None = None,
    keep_replicates: Iterable[str] = (),
    partial: bool = False,
    view: str = "uploads",
    membership: str = "client",
    participants: pd.DataFrame | None = None,
    lam: float = 1.0,
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Run attacks against each target client under each protocol; keep some replicates.

    **The resample** (:func:`bootstrap_strata`). Per protocol one stratified bootstrap
    serves every target, attack and official draw: each owner group (the held-out
    samples, each client's samples) is resampled within itself, with replacement, the
    draw seeded by ``(*bootstrap_keys, protocol, group, size)``
    (:func:`fedmia.attacker.uncertainty.stable_seed`); target t's members are its group's
    resample and its non-members the other groups'. Each row's interval is a
    stratified bootstrap (members and non-members keep their counts), and rows of
    different targets and attacks are paired: replicate ``b`` resamples the same
    samples in all of them, so a mean over targets of replicate ``b`` carries the
    correlation of targets that share the non-member pool (the findings' within-run
    intervals, :func:`fedmia.report.findings.findings`). Under ``official``, slot positions are
    resampled within each slot group (see :func:`bootstrap_strata`).

    Args:
        names: attack names (:data:`ATTACKS`).
        mdm: the measure table (only the attacks' measure columns are required).
        owner: owning client of each sample, indexed by ``sample_id`` (−1 = held out).
        targets: target client ids (default: every client in the table).
        attack_rounds: rounds multi-round attacks combine (default: all in the table; an
            empty list leaves multi-round attacks without rows, as after a divergence
            before the first attacked round); single-round attacks are scored at every
            round of the table.
        protocols: non-member protocols (:data:`PROTOCOLS`; ``None``: every registered one).
        official: the official protocol's draws.
        ddof: FedMIA's variance ddof.
        outlier_filter: attack name → whether FedMIA's outlier filter applies.
        lira: LiRA's options (every ``lira`` attack).
        rmia: RMIA's ``a`` and γ (every ``rmia`` attack). Its population is a draw's
            held-out slots, its cross-fitting coins seeded by ``(*bootstrap_keys,
            protocol, draw, target)`` (:func:`rmia_halves`).
        fpr_rule: how TPR at FPR α counts the limit (:data:`fedmia.attacker.metrics.FPR_RULES`).
        roc_points: the most ROC points kept per row (:func:`fedmia.attacker.metrics.roc_points`).
        n_boot: bootstrap replicates per row for the intervals (0: none, NaN columns).
        bootstrap_keys: the keys naming the run in the resample's seeds (the stage
            passes the cell's keys, so that cells resample independently); default
            ``(official.seed,)``.
        keep_replicates: attacks whose replicates are returned (e.g.
            :func:`finding_attacks`).
        partial: the cell sampled its participants (``train.participation`` below 1): a
            round may lack clients, each target is scored in the rounds it took part in
            (module docstring, :func:`target_rounds`) and ``n_rounds`` is its own; a
            target without a measured round is skipped.
        view: the threat view the table ``mdm`` shows (:data:`VIEWS`), the ``view`` column
            of every row; every attack must apply under it (:attr:`AttackSpec.views`).
        membership: the membership level (:data:`fedmia.core.contracts.MEMBERSHIP_LEVELS`),
            the ``membership`` column. ``federation``: ``mdm`` is one pseudo-client's table
            (``client_id`` :data:`FEDERATION_CLIENT`: :func:`strongest_upload`, or the
            aggregate's, :func:`aggregate_as_client`), ``owner`` maps any client's sample
            to it (:func:`federation_owner`), only ``single`` and ``series`` attacks, and
            the rows say ``target`` :data:`fedmia.core.contracts.FEDERATION_TARGET`. There
            ``aligned`` and ``heldout`` coincide (every non-member is held out) and
            ``official`` redraws the held-out slots per round.
        participants: the ``contrast`` attacks' input (and theirs only): who took part,
            a bool DataFrame indexed by round (every round of ``mdm``) with a column per
            client id (R×K), derived from the keys of the uploads' measure table alone;
            ``mdm`` is then the aggregate view's table (one ``client_id``). Targets are its
            clients; under ``official`` the aggregate's non-member slots are the target's
            draws (:func:`official_slots`, the target's column).
        lam: the contrast's λ (:func:`contrast_lambda`).

    Returns:
        ``(tables, replicates)``. ``tables``: attack name → one row per (protocol, draw,
        target, round) with :data:`fedmia.core.contracts.RESULT_COLUMNS`: ``view`` and
        ``membership`` as given; ``draw`` is 0 for
        ``aligned``; ``round`` is −1 for a multi-round score; ``attacked`` whether the
        round is one of ``attack_rounds`` (a single-round attack at a round observed only
        for the figures is False; only attacked rounds are candidates when a report
        picks a round); ``n_rounds`` the rounds a score combines (1 for single-round);
        the :data:`fedmia.attacker.metrics.METRICS` (a TPR is NaN where undefined); for the AUC
        and each TPR its 95 % percentile bootstrap interval ``<metric>_ci_low``,
        ``<metric>_ci_high`` and standard error ``<metric>_se`` (the resample above),
        and for each TPR ``<metric>_fp``, the false positives it rests on (−1 where
        undefined); the ROC points as float64 arrays. ``replicates``: one row per
        (attack in ``keep_replicates``, protocol, draw, target, round) for attacked
        rounds and multi-round scores, :data:`fedmia.core.contracts.REPLICATE_COLUMNS` but the
        cell's keys: the B replicates of each of :data:`fedmia.core.contracts.REPLICATE_METRICS`
        as float32 arrays (no row with ``n_boot = 0``).

    Raises:
        ValueError: as :func:`validate_measures`; an unknown protocol or FPR rule;
            attack rounds the table lacks; an official draw larger than its pool; an
            unknown view or membership level, an attack that does not apply under the
            view or level, ``contrast`` attacks without ``participants`` (or others with).
    """
    specs = [ATTACKS.get(n) for n in names]
    _check_level(specs, view, membership, participants)
    protocols = PROTOCOLS.registered() if protocols is None else list(protocols)
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"unknown or no protocol(s) {bad}; choose from {PROTOCOLS.registered()}")
    metrics.check_fpr_rule(fpr_rule)
    if official.draws < 1:
        raise ValueError(f"the official protocol needs at least 1 draw; got {official.draws}")
    keep = set(keep_replicates)
    if keep and (view, membership) != ("uploads", "client"):
        raise ValueError(
            f"replicates are kept for the uploads view's client level only (got view "
            f"{view!r}, membership {membership!r}): pass keep_replicates=()"
        )
    run_keys = tuple(bootstrap_keys) if bootstrap_keys is not None else (official.seed,)
    measures = sorted({m for s in specs for m in s.measures})
    if participants is None:
        cube, own, targets = _check(mdm, owner, targets, measures, partial)
        present, clients = cube.present, cube.clients
    else:
        cube, own, targets, present = _check_participants(
            mdm, owner, targets, measures, participants
        )
        clients = participants.columns.to_numpy(np.int64)
    if membership == "federation" and (cube.clients.tolist(), targets) != (
        [FEDERATION_CLIENT],
        [FEDERATION_CLIENT],
    ):
        raise ValueError(
            "the federation level attacks one pseudo-client, client_id "
            f"{FEDERATION_CLIENT}, as the only target; got clients {cube.clients.tolist()} "
            f"and targets {targets} (build the table with strongest_upload or "
            "aggregate_as_client)"
        )
    attacked = attacked_mask(cube, attack_rounds)
    signed = {(m, sign): sign * cube.values[m] for s in specs for m, sign in s.signals}
    filt = dict(outlier_filter or {})
    need_halves = any(s.kind == "rmia" for s in specs)
    rows: dict[str, list[dict]] = {s.name: [] for s in specs}
    kept: list[dict] = []
    for protocol in protocols:
        for draw in range(official.draws if PROTOCOLS.get(protocol).redrawn else 1):
            for target in targets:
                t = int(np.searchsorted(clients, target))
                slots = protocol_slots(
                    protocol, own, target, len(cube.rounds), clients, official, draw
                )
                if participants is not None and slots.index.ndim == 3:
                    # the aggregate, one "client": the target's draws of the round
                    slots = replace(slots, index=slots.index[:, t : t + 1], ref_weights=None)
                xs = {key: _slot_values(v, slots) for key, v in signed.items()}
                halves = (
                    rmia_halves(slots, (*run_keys, protocol, draw, target)) if need_halves else None
                )
                memo: dict[tuple, np.ndarray] = {}  # LiRA's z, RMIA's log LR: once a target
                batch: list[tuple[str, dict[str, Any], np.ndarray]] = []
                for spec in specs:
                    used = target_rounds(spec.kind, t, attacked, present)
                    if spec.multi_round and not used.any():
                        continue  # no attacked round to combine (for this target)
                    scores = score_slots(
                        spec,
                        [xs[sig] for sig in spec.signals],
                        t,
                        attacked,
                        ref_weights=slots.ref_weights,
                        ddof=ddof,
                        outlier_filter=filt.get(spec.name, False),
                        lira=lira,
                        rmia=rmia,
                        population=slots.group == -1,
                        halves=halves,
                        present=present,
                        memo=memo,
                        lam=lam,
                    )
                    if spec.kind == "single":
                        rounds, hit = cube.rounds.tolist(), attacked.tolist()
                        if present is not None:  # the rounds the target took part in
                            took = present[:, t]
                            rounds, hit = cube.rounds[took].tolist(), attacked[took].tolist()
                            scores = scores[took]
                    else:
                        rounds, hit = [MULTI_ROUND], [True]
                    n_rounds = 1 if spec.kind == "single" else int(used.sum())
                    for rnd, was_attacked, sc in zip(rounds, hit, scores, strict=True):
                        batch.append(
                            (
                                spec.name,
                                {
                                    "protocol": protocol,
                                    "view": view,
                                    "membership": membership,
                                    "draw": draw,
                                    "target": target
                                    if membership == "client"
                                    else FEDERATION_TARGET,
                                    "round": rnd,
                                    "attacked": was_attacked,
                                    "n_rounds": n_rounds,
                                },
                                sc,
                            )
                        )
                if not batch:
                    continue
                stacked = np.stack([sc for _, _, sc in batch])  # rows × slots
                strata = bootstrap_strata(slots, (*run_keys, protocol))
                rocs = [metrics.roc_counts(sc, slots.is_member) for sc in stacked]  # one sort
                ci, reps = _intervals(stacked, slots, strata, rocs, n_boot=n_boot, rule=fpr_rule)
                for i, ((name, keys, _), extra, roc) in enumerate(
                    zip(batch, ci, rocs, strict=True)
                ):
                    fpr, tpr = metrics.roc_points_of(roc, roc_points)
                    rows[name].append(
                        {
                            **keys,
                            **metrics.metrics_of(roc, fpr_rule),
                            **extra,
                            "roc_fpr": fpr,
                            "roc_tpr": tpr,
                        }
                    )
                    if reps and name in keep and keys["attacked"]:
                        kept.append(
                            {
                                "attack": name,
                                **{k: keys[k] for k in REPLICATE_KEYS},
                                **{
                                    f"{m}_replicates": reps[m][i].astype(np.float32)
                                    for m in REPLICATE_METRICS
                                },
                            }
                        )
    out = {}
    dtypes = {c: t for c, t in ATTACK_DTYPES.items() if c in RESULT_COLUMNS}
    for spec in specs:
        res = pd.DataFrame(rows[spec.name], columns=list(RESULT_COLUMNS)).astype(dtypes)
        out[spec.name] = res.sort_values(["protocol", "draw", "target", "round"], ignore_index=True)
        aligned = res[res.protocol == protocols[0]]
        log.info(
            "attack %s: %d target(s) × %d protocol draw(s) of %d samples; mean AUC (%s) %.3f",
            spec.name,
            len(targets),
            res.groupby(["protocol", "draw"]).ngroups,
            len(cube.sample_ids),
            protocols[0],
            aligned["auc"].mean(),
        )
    cols = [c for c in REPLICATE_COLUMNS if c not in CELL_KEYS]
    replicates = pd.DataFrame(kept, columns=cols).astype(
        {c: t for c, t in REPLICATE_DTYPES.items() if c in cols}
    )
    return out, replicates.sort_values(
        ["attack", "protocol", "draw", "target", "round"], ignore_index=True
    )


def run_attack(
    name: str,
    mdm: pd.DataFrame,
    owner: pd.Series,
    targets: Iterable[int] | None = None,
    *,
    outlier_filter: bool = False,
    **options: Any,
) -> pd.DataFrame:
    """:func:`run_attacks` for one attack; its result table.

    ``outlier_filter`` applies FedMIA's outlier filter (ignored by other attacks); the
    other keyword options are :func:`run_attacks`'s.
    """
    return run_attacks(
        [name], mdm, owner, targets, outlier_filter={name: outlier_filter}, **options
    )[name]
