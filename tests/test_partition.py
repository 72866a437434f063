from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedmia import pipeline
from fedmia.core.config import PartitionConfig
from fedmia.federation.partition import PartitionError, global_test_ids, make_partition


def cfg(**kw) -> PartitionConfig:
    base = dict(
        kind="iid",
        num_clients=5,
        samples_per_client=100,
        eval_members_per_client=20,
        eval_nonmembers=50,
    )
    base.update(kw)
    return PartitionConfig.from_dict(base)


def test_iid_sizes_disjoint_and_eval(labels_split):
    labels, is_test = labels_split
    df = make_partition(labels, is_test, cfg(), seed=0)
    assert list(df.columns) == [
        "sample_id",
        "client_id",
        "is_test",
        "eval",
        "canary",
        "canary_in",
        "filler",
    ]
    assert not (df.canary | df.canary_in | df.filler).any()  # no audit asked for
    # the global model is tested on the whole test split
    assert (global_test_ids(df) == np.flatnonzero(is_test)).all()
    assert (df["sample_id"].to_numpy() == np.arange(len(labels))).all()
    sizes = df[df.client_id >= 0].groupby("client_id").size()
    assert sizes.tolist() == [100] * 5
    # clients train only on the training split; a sample belongs to one client at most
    assert not df[df.client_id >= 0].is_test.any()
    assert df.sample_id.is_unique
    ev = df[df["eval"]]
    assert ev[ev.client_id >= 0].groupby("client_id").size().tolist() == [20] * 5
    nonmem = ev[ev.client_id == -1]
    assert len(nonmem) == 50 and nonmem.is_test.all()


def test_all_training_data_when_samples_per_client_is_null(labels_split):
    labels, is_test = labels_split
    df = make_partition(labels, is_test, cfg(samples_per_client=None), seed=0)
    sizes = df[df.client_id >= 0].groupby("client_id").size()
    assert sizes.sum() == (~is_test).sum() and sizes.max() - sizes.min() <= 1


def test_dirichlet_skew_grows_as_beta_shrinks(labels_split):
    labels, is_test = labels_split

    def skew(df: pd.DataFrame) -> float:
        tr = df[df.client_id >= 0].assign(label=labels[df[df.client_id >= 0].sample_id])
        frac = tr.groupby("client_id").label.value_counts(normalize=True)
        return float(frac.groupby(level=0).max().mean())  # mean dominant-class share

    iid = skew(make_partition(labels, is_test, cfg(), 0))
    d1 = skew(make_partition(labels, is_test, cfg(kind="dirichlet", beta=1.0), 0))
    d01 = skew(
        make_partition(
            labels, is_test, cfg(kind="dirichlet", beta=0.1, eval_members_per_client=5), 0
        )
    )
    assert iid < 0.25 < d1 < d01
    assert d01 > 0.5


def test_dirichlet_total_and_min_size(labels_split):
    labels, is_test = labels_split
    df = make_partition(labels, is_test, cfg(kind="dirichlet", beta=0.5), seed=3)
    sizes = df[df.client_id >= 0].groupby("client_id").size()
    assert sizes.sum() == 500 and sizes.min() >= 20 and sizes.nunique() > 1


def test_same_seed_same_partition_other_seed_differs(labels_split):
    labels, is_test = labels_split
    for kind, extra in (("iid", {}), ("dirichlet", {"beta": 1.0})):
        a = make_partition(labels, is_test, cfg(kind=kind, **extra), seed=7)
        b = make_partition(labels, is_test, cfg(kind=kind, **extra), seed=7)
        c = make_partition(labels, is_test, cfg(kind=kind, **extra), seed=8)
        pd.testing.assert_frame_equal(a, b)
        assert not a.equals(c)


def test_partition_file_is_byte_identical(digits_files, tmp_path):
    part = dict(
        kind="dirichlet",
        beta=0.5,
        num_clients=4,
        samples_per_client=40,
        eval_members_per_client=10,
        eval_nonmembers=30,
    )
    pipeline.partition(digits_files, part, 1, tmp_path / "a.parquet")
    pipeline.partition(digits_files, part, 1, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(samples_per_client=1000), "training split has 1600"),
        (dict(eval_nonmembers=401), "test split has only 400"),
        (dict(eval_members_per_client=101), "fewer samples than eval_members_per_client"),
        (dict(kind="dirichlet", beta=0.01, eval_members_per_client=99), "could not give all 5"),
    ],
)
def test_impossible_sizes_raise(labels_split, kw, msg):
    labels, is_test = labels_split
    with pytest.raises(PartitionError, match=msg):
        make_partition(labels, is_test, cfg(**kw), seed=0)


def audited(labels_split, seed: int, **kw) -> pd.DataFrame:
    """The partition of 4 iid clients of 100 samples with 200 canaries for client 2 (the
    settings ``kw`` changed)."""
    labels, is_test = labels_split
    base = dict(
        kind="iid",
        num_clients=4,
        samples_per_client=100,
        eval_members_per_client=20,
        eval_nonmembers=100,
        audit_canaries=200,
        audit_target=2,
    )
    return make_partition(labels, is_test, PartitionConfig(**{**base, **kw}), seed=seed)


def test_audit_canaries_are_held_out_samples_with_fair_coins(labels_split):
    df = audited(labels_split, 3)
    c = df[df.canary]
    assert len(c) == 200 and c.is_test.all() and not c["eval"].any()
    assert (c.client_id == np.where(c.canary_in, 2, -1)).all()
    assert 70 < c.canary_in.sum() < 130
    # the canaries have their own stream: the rest of the partition is unchanged
    plain = audited(labels_split, 3, audit_canaries=0, audit_target=0)
    assert (plain["eval"] == df["eval"]).all()
    audit = df.canary | df.filler
    assert (plain.client_id[~audit] == df.client_id[~audit]).all()
    assert (plain.client_id[audit] == -1).all()  # canaries and fillers were held out
    with pytest.raises(PartitionError, match="audit_canaries = 400 but only 300 held-out"):
        audited(labels_split, 3, audit_canaries=400, audit_target=0)


def test_the_audit_target_s_size_does_not_depend_on_the_coins(labels_split):
    """Slot i holds canary i if its coin says in, else filler i: the target always trains
    on its shard + m samples; fillers are never canaries, evaluated or tested."""
    counts = {}
    for seed in (3, 4):
        df = audited(labels_split, seed)
        counts[seed] = int(df.canary_in.sum())
        sizes = df[df.client_id >= 0].groupby("client_id").size()
        assert sizes.tolist() == [100, 100, 300, 100]  # target 2: 100 + 200 slots
        f = df[df.filler]
        assert len(f) == 200 and not (f.canary | f["eval"]).any()
        # a filler trains exactly when its slot's canary is out: as many as the coins out
        assert (f.client_id.isin([2, -1])).all()
        assert (f.client_id == 2).sum() == 200 - counts[seed]
        target = df[df.client_id == 2]
        assert (target.canary == target.canary_in).all()  # only included canaries train
        assert target.canary.sum() + target.filler.sum() == 200
        # the global model's test samples: the test split outside the audit, trained on by
        # no one, whatever the coins
        tested = df.set_index("sample_id").loc[global_test_ids(df)]
        assert tested.is_test.all() and (tested.client_id == -1).all()
        assert not (tested.canary | tested.filler).any()
        assert len(tested) == 400 - 200 - int((df.filler & df.is_test).sum())
    assert counts[3] != counts[4]  # two coin draws, one target size


def test_fillers_are_reproducible_and_need_enough_held_out_samples(labels_split):
    pd.testing.assert_frame_equal(audited(labels_split, 3), audited(labels_split, 3))
    # all 1,600 training samples dealt: 300 held-out test samples outside the evaluation
    # set hold the 200 canaries but not 200 fillers besides
    with pytest.raises(
        PartitionError,
        match=r"audit_canaries = 200 needs 200 canaries and "
        r"200 fillers .* only 100 held-out samples remain outside the "
        r"evaluation set and the canaries; lower audit_canaries, "
        r"eval_nonmembers or samples_per_client",
    ):
        audited(labels_split, 3, samples_per_client=None)
