"""Membership inference attacks of the server on the measure table (pure compute).

Input is the *measure table* of one cell: long and tidy, one row per
``(round, client_id, sample_id)`` with float columns ``loss, cos, grad_diff,
grad_norm`` (see :mod:`fedmia.measures`); ``client_id`` is the client whose upload
produced the value, and every client has a row for every evaluation sample in every
observed round. It is pivoted once into float64 arrays R×K×N (rounds × clients ×
samples, each axis sorted), so samples line up by ``sample_id`` whatever the row order.

Membership of target client ``t`` ("mix" protocol): members are the evaluation
samples ``t`` owns; non-members are all other evaluation samples (held-out test
samples and the other clients' samples). ``owner`` is a Series indexed by
``sample_id``: ``-1`` for a held-out sample, ``k >= 0`` for the client that trains on it.

Attacks (:data:`ATTACKS`; score: higher = more likely a member; ``s`` = sign × measure):

* ``single`` (``loss``, ``cos``, ``grad_norm``): ``s`` of the target's upload, per round.
* ``series`` (``loss_series``, ``cos_series``, ``grad_diff``): the mean of ``s`` over
  rounds, reported as round ``-1``; ``grad_diff`` also reports each round.
* ``fedmia`` (``fedmia_loss``, ``fedmia_cos``): per round, Φ((s_t − μ)/σ) where μ, σ are
  the mean and standard deviation (ddof=1) of the same sample's ``s`` under the K−1
  non-target clients' uploads (:func:`fedmia_cdf`); the mean over rounds, round ``-1``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy.special import ndtr

from fedmia import metrics
from fedmia.registry import Registry

log = logging.getLogger(__name__)

KEYS = ("round", "client_id", "sample_id")
MEASURES = ("loss", "cos", "grad_diff", "grad_norm")
#: ``round`` of a score that uses all observed rounds.
MULTI_ROUND = -1
#: Floor of the reference standard deviation of the FedMIA attacks.
SIGMA_FLOOR = 1e-12
#: FedMIA's outlier filter drops reference values above μ + OUTLIER_Z·σ.
OUTLIER_Z = 3.0


@dataclass(frozen=True)
class AttackSpec:
    """One attack: which measure, its orientation, and how rounds and clients combine.

    Attributes:
        name: code name (registry key).
        measure: column of the measure table.
        sign: +1 or −1, so that ``sign × measure`` is higher for members.
        kind: ``single`` (per round), ``series`` (mean over rounds) or ``fedmia``
            (per-sample Gaussian CDF against the non-target clients, mean over rounds).
        also_per_round: a multi-round attack that also reports each round's score.
        paper: the paper's names, (v1, v3) — the 2025 version renamed some.
    """

    name: str
    measure: str
    sign: int
    kind: Literal["single", "series", "fedmia"]
    also_per_round: bool = False
    paper: tuple[str, str] = ("", "")


ATTACKS: Registry[AttackSpec] = Registry("attack")
for _spec in (
    AttackSpec("loss", "loss", -1, "single", paper=("Loss-I", "Blackbox-Loss")),
    AttackSpec("cos", "cos", +1, "single", paper=("Cos-I", "Grad-Cosine")),
    AttackSpec("grad_norm", "grad_norm", -1, "single", paper=("Grad-Norm", "Grad-Norm")),
    AttackSpec("grad_diff", "grad_diff", +1, "series", also_per_round=True,
               paper=("Grad-Diff", "Grad-Diff")),
    AttackSpec("loss_series", "loss", -1, "series", paper=("Loss-II", "Loss-Series")),
    AttackSpec("cos_series", "cos", +1, "series", paper=("Cos-II", "Avg-Cosine")),
    AttackSpec("fedmia_loss", "loss", -1, "fedmia", paper=("Loss-III", "FedMIA-I")),
    AttackSpec("fedmia_cos", "cos", +1, "fedmia", paper=("Cos-III", "FedMIA-II")),
):
    ATTACKS.register(_spec.name)(_spec)
#: The paper's column order (Table 1).
PAPER_ORDER = ("loss", "loss_series", "fedmia_loss", "cos", "cos_series", "fedmia_cos",
               "grad_norm", "grad_diff")


@dataclass(frozen=True)
class MeasureCube:
    """The measure table as dense arrays.

    Attributes:
        rounds: int64 R, sorted observed rounds.
        clients: int64 K, sorted client ids.
        sample_ids: int64 N, sorted evaluation sample ids.
        values: measure name → float64 R×K×N; ``values[m][r, k, i]`` is measure ``m`` of
            sample ``sample_ids[i]`` under client ``clients[k]``'s upload at ``rounds[r]``.
    """

    rounds: np.ndarray
    clients: np.ndarray
    sample_ids: np.ndarray
    values: Mapping[str, np.ndarray]

    @classmethod
    def from_frame(cls, mdm: pd.DataFrame, measures: Sequence[str] = MEASURES) -> MeasureCube:
        """Pivot a measure table after checking columns, duplicates, finiteness and the grid.

        Raises:
            ValueError: naming the problem (see :func:`validate_measures`).
        """
        missing = [c for c in (*KEYS, *measures) if c not in mdm.columns]
        if missing:
            raise ValueError(f"measure table lacks column(s) {missing}; "
                             f"it has {list(mdm.columns)}")
        if len(mdm) == 0:
            raise ValueError("measure table is empty")
        for c in KEYS:
            if not pd.api.types.is_integer_dtype(mdm[c]):
                raise ValueError(f"measure table column '{c}' must be integer, "
                                 f"not {mdm[c].dtype}")
        r, c, s = (mdm[k].to_numpy(np.int64) for k in KEYS)
        order = np.lexsort((s, c, r))
        r, c, s = r[order], c[order], s[order]
        dup = (r[1:] == r[:-1]) & (c[1:] == c[:-1]) & (s[1:] == s[:-1])
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            raise ValueError(f"measure table has {int(dup.sum())} duplicated (round, client_id, "
                             f"sample_id) row(s), e.g. ({r[i]}, {c[i]}, {s[i]})")
        rounds, clients, sample_ids = np.unique(r), np.unique(c), np.unique(s)
        shape = (len(rounds), len(clients), len(sample_ids))
        if len(r) != np.prod(shape):
            raise ValueError(_grid_gaps(mdm, clients, sample_ids))
        values = {}
        for m in measures:
            v = mdm[m].to_numpy(np.float64)[order]
            bad = ~np.isfinite(v)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"measure column '{m}' has {int(bad.sum())} NaN or infinite "
                                 f"value(s), e.g. at round {r[i]}, client {c[i]}, "
                                 f"sample_id {s[i]}")
            values[m] = v.reshape(shape)
        return cls(rounds, clients, sample_ids, values)

    def client_index(self, client: int) -> int:
        """Position of ``client`` on the client axis; ValueError if the table lacks it."""
        i = int(np.searchsorted(self.clients, client))
        if i == len(self.clients) or self.clients[i] != client:
            raise ValueError(f"target client {client} has no rows in the measure table "
                             f"(clients: {self.clients.tolist()})")
        return i


def _grid_gaps(mdm: pd.DataFrame, clients: np.ndarray, sample_ids: np.ndarray,
               limit: int = 5) -> str:
    """Describe the missing cells of a duplicate-free, incomplete grid."""
    problems = []
    for rnd, g in mdm.groupby("round", sort=True):
        lacking = np.setdiff1d(clients, g["client_id"].to_numpy())
        if len(lacking):
            problems.append(f"round {rnd} lacks client(s) {lacking.tolist()}")
        for cl, gc in g.groupby("client_id", sort=True):
            miss = np.setdiff1d(sample_ids, gc["sample_id"].to_numpy())
            if len(miss):
                problems.append(f"round {rnd}, client {cl} lacks {len(miss)} of "
                                f"{len(sample_ids)} samples (e.g. sample_id {miss[0]})")
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return ("incomplete measure table (every client needs every sample in every round): "
            + "; ".join(problems[:limit]) + more)


def _membership(cube: MeasureCube, owner: pd.Series, targets: Iterable[int]
                ) -> dict[int, np.ndarray]:
    """Check ``owner`` and the targets; bool N member mask of each target."""
    if owner.index.has_duplicates:
        dups = owner.index[owner.index.duplicated()]
        raise ValueError(f"owner has {len(dups)} duplicated sample_id(s), e.g. {dups[0]}")
    known = np.isin(cube.sample_ids, owner.index.to_numpy())
    if not known.all():
        raise ValueError(f"{int((~known).sum())} sample(s) of the measure table are not in "
                         f"owner, e.g. sample_id {cube.sample_ids[~known][0]}")
    own = owner.reindex(cube.sample_ids).to_numpy()
    out = {}
    n = len(own)
    for t in targets:
        cube.client_index(t)
        is_member = own == t
        if not is_member.any():
            raise ValueError(f"target client {t} owns none of the {n} evaluation samples "
                             "(no members)")
        if is_member.all():
            raise ValueError(f"target client {t} owns all {n} evaluation samples "
                             "(no non-members)")
        out[int(t)] = is_member
    return out


def _check(mdm: pd.DataFrame, owner: pd.Series, targets: Iterable[int] | None,
           measures: Sequence[str]) -> tuple[MeasureCube, dict[int, np.ndarray]]:
    cube = MeasureCube.from_frame(mdm, measures)
    targets = cube.clients.tolist() if targets is None else list(targets)
    return cube, _membership(cube, owner, targets)


def validate_measures(mdm: pd.DataFrame, owner: pd.Series, targets: Iterable[int] | None = None,
                      *, measures: Sequence[str] = MEASURES) -> None:
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


def fedmia_cdf(target: np.ndarray, reference: np.ndarray, *, outlier_filter: bool = False
               ) -> np.ndarray:
    """FedMIA's per-sample score Φ((s_t − μ)/σ) against the non-target clients.

    Args:
        target: float (..., N), the score ``s_t`` under the target's upload.
        reference: float (..., M, N), the same samples' scores under the M >= 2
            non-target uploads.
        outlier_filter: drop reference values above μ + 3σ and recompute μ, σ from the
            rest (one pass; a sample keeps its unfiltered μ, σ if fewer than 2 values
            remain). With ddof=1 no value of M references can exceed μ + 3σ unless
            M >= 11, as (M − 1)/√M bounds its z-score.

    Returns:
        float64 (..., N) in [0, 1]: Φ((s_t − μ)/max(σ, 1e-12)), μ and σ (ddof=1) over M.
    """
    if reference.shape[-2] < 2:
        raise ValueError(f"FedMIA needs at least 2 non-target clients; got {reference.shape[-2]}")
    mu = reference.mean(axis=-2)
    sd = reference.std(axis=-2, ddof=1)
    if outlier_filter:
        keep = reference <= (mu + OUTLIER_Z * sd)[..., None, :]
        n = keep.sum(axis=-2)
        ok = n >= 2
        nf = np.where(ok, n, 2)
        mu_f = np.where(keep, reference, 0.0).sum(axis=-2) / nf
        var_f = np.where(keep, (reference - mu_f[..., None, :]) ** 2, 0.0).sum(axis=-2) / (nf - 1)
        mu, sd = np.where(ok, mu_f, mu), np.where(ok, np.sqrt(var_f), sd)
    return ndtr((target - mu) / np.maximum(sd, SIGMA_FLOOR))


def _cube_scores(spec: AttackSpec, cube: MeasureCube, target: int, outlier_filter: bool
                 ) -> tuple[list[int], np.ndarray]:
    """Rounds and their scores (len(rounds)×N) of one attack against one target."""
    t = cube.client_index(target)
    s = spec.sign * cube.values[spec.measure]  # R×K×N
    rounds = cube.rounds.tolist()
    if spec.kind == "single":
        return rounds, s[:, t]
    if spec.kind == "series":
        per_round = s[:, t]
    else:
        per_round = fedmia_cdf(s[:, t], np.delete(s, t, axis=1), outlier_filter=outlier_filter)
    multi = per_round.mean(axis=0, keepdims=True)
    if spec.also_per_round:
        return [*rounds, MULTI_ROUND], np.concatenate([per_round, multi])
    return [MULTI_ROUND], multi


def attack_scores(name: str, mdm: pd.DataFrame | MeasureCube, target: int, *,
                  outlier_filter: bool = False) -> pd.DataFrame:
    """Scores of attack ``name`` against target client ``target``.

    Args:
        name: attack name (:data:`ATTACKS`).
        mdm: the measure table, or its :class:`MeasureCube`.
        target: the target client id.
        outlier_filter: FedMIA attacks drop reference values above μ+3σ (ignored by others).

    Returns:
        Columns ``round`` (int64; −1 = a multi-round score), ``sample_id`` (int64),
        ``score`` (float64, higher = more likely a member); one row per (round, sample),
        rows in the order of the attack's rounds (per-round first, then −1), then sample_id.
    """
    spec = ATTACKS.get(name)
    cube = mdm if isinstance(mdm, MeasureCube) else MeasureCube.from_frame(mdm, [spec.measure])
    rounds, scores = _cube_scores(spec, cube, target, outlier_filter)
    n = len(cube.sample_ids)
    return pd.DataFrame({
        "round": np.repeat(np.asarray(rounds, dtype=np.int64), n),
        "sample_id": np.tile(cube.sample_ids, len(rounds)),
        "score": scores.reshape(-1),
    })


def run_attack(name: str, mdm: pd.DataFrame, owner: pd.Series,
               targets: Iterable[int] | None = None, *, outlier_filter: bool = False,
               roc_points: int = 200) -> pd.DataFrame:
    """Run attack ``name`` against each target client and measure its success.

    Args:
        name: attack name (:data:`ATTACKS`).
        mdm: the measure table (only the attack's measure column is required).
        owner: owning client of each sample, indexed by ``sample_id`` (−1 = held out).
        targets: target client ids (default: every client in the table).
        outlier_filter: FedMIA attacks drop reference values above μ+3σ (ignored by others).
        roc_points: the most ROC points kept per row (:func:`fedmia.metrics.roc_points`).

    Returns:
        One row per (target, round), sorted so: ``target`` (int64), ``round`` (int64;
        −1 = multi-round), the :data:`fedmia.metrics.METRICS` (float64; a TPR is NaN
        where undefined), ``n_members``, ``n_nonmembers`` (int64), ``roc_fpr``,
        ``roc_tpr`` (float64 arrays).

    Raises:
        ValueError: as :func:`validate_measures`, for the attack's measure.
    """
    spec = ATTACKS.get(name)
    cube, members = _check(mdm, owner, targets, [spec.measure])
    rows = []
    for t, is_member in members.items():
        rounds, scores = _cube_scores(spec, cube, t, outlier_filter)
        for rnd, sc in zip(rounds, scores, strict=True):
            fpr, tpr = metrics.roc_points(sc, is_member, roc_points)
            rows.append({"target": t, "round": rnd, **metrics.attack_metrics(sc, is_member),
                         "roc_fpr": fpr, "roc_tpr": tpr})
    res = pd.DataFrame(rows).astype({"target": np.int64, "round": np.int64,
                                     "n_members": np.int64, "n_nonmembers": np.int64})
    log.info("attack %s: %d target(s) × %d score(s) of %d samples; mean AUC %.3f", name,
             len(members), len(res) // max(len(members), 1), len(cube.sample_ids),
             res["auc"].mean())
    return res.sort_values(["target", "round"], ignore_index=True)
