"""Client partitions and the fixed evaluation set.

A partition assigns every sample of a prepared dataset a ``client_id``
(``-1``: no client trains on it — the test split, and training samples left over
when ``samples_per_client`` asks for fewer than there are) and an ``eval`` flag:
each client's evaluation members plus ``eval_nonmembers`` held-out test samples.
It is drawn once, from its own seed, and saved, so every later stage and every
model sees the same samples.

A one-run audit (``audit_canaries`` = m) gives the audit target m *slots*: slot i
holds canary i when its coin says "in", else a fixed *filler* i, so the target trains
on its shard plus m samples whatever the coins. Canaries, coins and fillers come from
the audit's own stream; fillers are never scored, measured or tested
(:func:`_audit_slots`, :func:`global_test_ids`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from fedmia.core.config import PartitionConfig
from fedmia.core.registry import Registry

log = logging.getLogger(__name__)

HELD_OUT = -1
# Spawn keys of the independent random streams drawn from one seed (3 is
# fedmia.attacker.attacks.STREAM_OFFICIAL).
STREAM_PARTITION = 1
STREAM_TRAIN = 2
STREAM_AUDIT = 4
STREAM_AGGREGATION = 5
STREAM_IMPORT = 6
STREAM_PARTICIPATION = 7


def rng_for(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """An independent, reproducible generator for ``(seed, stream, *keys)``."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *keys]))


class PartitionError(ValueError):
    """The dataset cannot satisfy the partition's sizes; the message says which."""


#: A partition kind: ``(pool, labels, cfg, rng)`` → one sorted index array per client.
#: ``pool`` (int, sorted) holds the training samples to deal out, ``labels`` (int N) the
#: class of every sample of the dataset; every sample of ``pool`` goes to one client.
PartitionKind = Callable[
    [np.ndarray, np.ndarray, PartitionConfig, np.random.Generator], list[np.ndarray]
]
#: The partition kinds (``partitions.<key>.kind``), registered with ``@PARTITIONS.register``.
PARTITIONS: Registry[PartitionKind] = Registry("partition kind")


@PARTITIONS.register("iid")
def iid_shards(
    pool: np.ndarray, labels: np.ndarray, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Equal random shards (sizes differ by at most one)."""
    shards = np.array_split(rng.permutation(pool), cfg.num_clients)
    return [np.sort(s) for s in shards]


@PARTITIONS.register("dirichlet")
def dirichlet_shards(
    pool: np.ndarray, labels: np.ndarray, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-Dirichlet(β) shards, as the paper (:func:`_dirichlet`).

    Redrawn until every client can give its ``eval_members_per_client`` evaluation
    samples.
    """
    assert cfg.beta is not None
    return _dirichlet(pool, labels, cfg.num_clients, cfg.beta, cfg.eval_members_per_client, rng)


def _dirichlet(
    train_idx: np.ndarray,
    labels: np.ndarray,
    k: int,
    beta: float,
    min_size: int,
    rng: np.random.Generator,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-Dirichlet split: per class, proportions p ~ Dir(β·1_K) over clients.

    Redraws (up to ``max_tries``) until every client holds ``min_size`` samples.
    """
    classes = np.unique(labels[train_idx])
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(train_idx[labels[train_idx] == c])
            p = rng.dirichlet(np.full(k, beta))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].append(chunk)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise PartitionError(
        f"dirichlet(beta={beta}) could not give all {k} clients at least {min_size} samples "
        f"in {max_tries} draws; raise beta, samples_per_client, or lower num_clients or "
        "eval_members_per_client"
    )


def make_partition(
    labels: np.ndarray, is_test: np.ndarray, cfg: PartitionConfig, seed: int
) -> pd.DataFrame:
    """Deal the training split to clients and draw the evaluation set.

    Args:
        labels: int array N, class of each sample.
        is_test: bool array N, True for the test split.
        cfg: the partition's configuration.
        seed: the cell's seed (same seed ⇒ same partition, byte for byte).

    Returns:
        One row per sample, ordered by ``sample_id``: ``sample_id`` (int64),
        ``client_id`` (int32, -1 = held out), ``is_test`` (bool), ``eval`` (bool),
        ``canary`` and ``canary_in`` (bool: an audit canary, and its coin: in the audit
        target's training data), ``filler`` (bool: an audit slot's filler, in the
        target's training data — ``client_id`` = the target — when its slot's canary
        is out, else held out; never in ``eval``, never a canary).
    """
    rng = rng_for(seed, STREAM_PARTITION)
    k = cfg.num_clients
    train_idx = np.flatnonzero(~is_test)
    test_idx = np.flatnonzero(is_test)
    n_train = len(train_idx) if cfg.samples_per_client is None else k * cfg.samples_per_client
    if n_train > len(train_idx):
        raise PartitionError(
            f"the partition asks for {k} clients × {cfg.samples_per_client} samples = {n_train} "
            f"training samples but the dataset's training split has {len(train_idx)}; lower "
            "samples_per_client or num_clients"
        )
    if cfg.eval_nonmembers > len(test_idx):
        raise PartitionError(
            f"eval_nonmembers = {cfg.eval_nonmembers} but the test split has only "
            f"{len(test_idx)} samples; lower eval_nonmembers"
        )
    kind = PARTITIONS.get(cfg.kind)
    pool = np.sort(rng.permutation(train_idx)[:n_train])
    shards = kind(pool, labels, cfg, rng)
    small = [(c, len(s)) for c, s in enumerate(shards) if len(s) < cfg.eval_members_per_client]
    if small:
        raise PartitionError(
            f"clients {small} (client, samples) hold fewer samples than "
            f"eval_members_per_client = {cfg.eval_members_per_client}; lower it or give "
            "clients more samples"
        )

    client_id = np.full(len(labels), HELD_OUT, dtype=np.int32)
    in_eval = np.zeros(len(labels), dtype=bool)
    for c, shard in enumerate(shards):
        client_id[shard] = c
        in_eval[rng.choice(shard, size=cfg.eval_members_per_client, replace=False)] = True
    in_eval[rng.choice(test_idx, size=cfg.eval_nonmembers, replace=False)] = True
    canary = np.zeros(len(labels), dtype=bool)
    canary_in = np.zeros(len(labels), dtype=bool)
    filler = np.zeros(len(labels), dtype=bool)
    if cfg.audit_canaries:
        ids, coins, fillers = _audit_slots(client_id, in_eval, test_idx, cfg, seed)
        canary[ids] = True
        canary_in[ids[coins]] = True
        filler[fillers] = True
        # slot i: canary i if its coin says "in", else filler i
        client_id[np.where(coins, ids, fillers)] = cfg.audit_target
        log.info(
            "audit: %d canaries from the held-out data, %d included in client %d's "
            "training data, %d fillers in the other slots",
            len(ids),
            int(coins.sum()),
            cfg.audit_target,
            int((~coins).sum()),
        )

    sizes = [len(s) for s in shards]
    log.info(
        "%s partition: %d clients, sizes min %d / max %d, %d evaluation samples",
        cfg.kind,
        k,
        min(sizes),
        max(sizes),
        int(in_eval.sum()),
    )
    return pd.DataFrame(
        {
            "sample_id": np.arange(len(labels), dtype=np.int64),
            "client_id": client_id,
            "is_test": is_test.astype(bool),
            "eval": in_eval,
            "canary": canary,
            "canary_in": canary_in,
            "filler": filler,
        }
    )


def evaluation_set(
    owner: np.ndarray, cfg: PartitionConfig, seed: int, where: str = "partition"
) -> np.ndarray:
    """The evaluation set of a recorded run's clients (its recording names none).

    ``eval_members_per_client`` samples of each client and ``eval_nonmembers`` of the
    held-out pool, drawn from ``(seed, STREAM_IMPORT)``.

    Args:
        owner: int N, the client of every sample (``HELD_OUT``: the held-out pool; below
            it, a sample the recording does not name, never drawn).
        cfg: the cell's partition config (its evaluation sizes, ``num_clients``).
        seed: the cell's seed.
        where: the config key of ``cfg``, for messages.

    Returns:
        bool N, the evaluation set.

    Raises:
        PartitionError: a client or the pool holds fewer samples than asked for.
    """
    rng = rng_for(seed, STREAM_IMPORT)
    in_eval = np.zeros(len(owner), dtype=bool)
    for c in range(cfg.num_clients):
        own = np.flatnonzero(owner == c)
        if len(own) < cfg.eval_members_per_client:
            raise PartitionError(
                f"{where}.eval_members_per_client = "
                f"{cfg.eval_members_per_client} but client {c} of the "
                f"recording owns {len(own)} samples; lower it"
            )
        in_eval[rng.choice(own, size=cfg.eval_members_per_client, replace=False)] = True
    pool = np.flatnonzero(owner == HELD_OUT)
    if len(pool) < cfg.eval_nonmembers:
        raise PartitionError(
            f"{where}.eval_nonmembers = {cfg.eval_nonmembers} but the "
            f"recording's held-out pool holds {len(pool)} samples; lower it"
        )
    in_eval[rng.choice(pool, size=cfg.eval_nonmembers, replace=False)] = True
    return in_eval


def draw_canaries(candidates: np.ndarray, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw m canaries from ``candidates`` and a fair coin for each (include or not).

    Args:
        candidates: int (N,), distinct sample ids to draw from.
        m: number of canaries, 1 ≤ m ≤ N.
        seed: seed of the ``np.random.Generator`` that draws both.

    Returns:
        ``(canary_ids, included)``: int (m,) sorted ids and bool (m,), ``included[j]``
        the coin of ``canary_ids[j]`` (each True with probability ½, independently).
    """
    candidates = np.asarray(candidates)
    if candidates.ndim != 1 or len(np.unique(candidates)) != len(candidates):
        raise ValueError("candidates must be a 1-D array of distinct ids")
    if not 1 <= m <= len(candidates):
        raise ValueError(f"m must be in [1, {len(candidates)}], got {m}")
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(candidates, size=m, replace=False))
    return ids, rng.random(m) < 0.5


def _audit_slots(
    client_id: np.ndarray,
    in_eval: np.ndarray,
    test_idx: np.ndarray,
    cfg: PartitionConfig,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The audit's canaries, coins and slot fillers (Steinke, Nasr & Jagielski 2023).

    Canaries: ``audit_canaries`` = m test samples outside the evaluation set, each
    included in ``audit_target``'s training data with probability ½ (the audit's stream,
    :func:`draw_canaries`). Fillers: m further held-out samples (no client's,
    outside the evaluation set and the canaries; either split), from a stream of the
    audit's own: filler i takes slot i when canary i is out, so the target's data size
    does not depend on the coins.

    Args:
        client_id: int32 N, the clients' shards (-1: held out), before the audit.
        in_eval: bool N, the evaluation set.
        test_idx: int, the test split's sample ids.
        cfg: the partition's configuration (m > 0).
        seed: the cell's seed.

    Returns:
        ``(canaries, coins, fillers)``: int m sorted canary ids, bool m their coins, int m
        the fillers (filler i belongs to canary i's slot).
    """
    m = cfg.audit_canaries
    candidates = test_idx[~in_eval[test_idx]]
    if m > len(candidates):
        raise PartitionError(
            f"audit_canaries = {m} but only {len(candidates)} held-out samples lie outside "
            "the evaluation set; lower audit_canaries or eval_nonmembers"
        )
    stream = int(rng_for(seed, STREAM_AUDIT).integers(2**62))
    ids, coins = draw_canaries(np.sort(candidates), m, stream)
    spare = np.flatnonzero((client_id == HELD_OUT) & ~in_eval)
    spare = spare[~np.isin(spare, ids)]
    if m > len(spare):
        raise PartitionError(
            f"audit_canaries = {m} needs {m} canaries and {m} fillers (a filler takes a "
            f"canary's slot in client {cfg.audit_target}'s data when its coin says out), but "
            f"only {len(spare)} held-out samples remain outside the evaluation set and the "
            "canaries; lower audit_canaries, eval_nonmembers or samples_per_client"
        )
    fillers = rng_for(seed, STREAM_AUDIT, 1).choice(spare, size=m, replace=False)
    return ids, coins, fillers


def global_test_ids(part: pd.DataFrame) -> np.ndarray:
    """Sample ids (int64, sorted) of the test split the global model is tested on.

    The test split's samples that no client trains on and that are not an audit's
    canaries or fillers (which, by their coins, may be trained on): the same samples
    whatever the coins. Without an audit, the whole test split.
    """
    keep = part["is_test"].to_numpy() & (part["client_id"].to_numpy() == HELD_OUT)
    for column in ("canary", "filler"):
        if column in part:
            keep &= ~part[column].to_numpy()
    return part["sample_id"].to_numpy()[keep]
