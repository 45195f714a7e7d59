"""Tests of k_fold_trainval_split and split_gallery_query."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from recognite.data import k_fold_trainval_split, split_gallery_query


def _make_df(num_labels: int = 23, seed: int = 5, int_labels: bool = False) -> pd.DataFrame:
    """Labels with 1..6 rows each, interleaved (not contiguous), plus an id column."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, size=num_labels)
    labels = np.repeat(np.arange(num_labels), counts)
    labels = labels[rng.permutation(len(labels))]
    if int_labels:
        values = [int(lab) * 10 + 3 for lab in labels]
    else:
        values = [f"class_{lab:02d}" for lab in labels]
    return pd.DataFrame(
        {"image": [f"img_{i}.png" for i in range(len(labels))], "label": values,
         "row_id": np.arange(len(labels))}
    )


def _legacy_k_fold(df, num_folds, val_fold, seed, label_key="label"):
    """The earlier release's algorithm, verbatim (it seeds the global RNG, so we
    restore the global state afterwards)."""
    state = np.random.get_state()
    try:
        labels = np.array(df[label_key].unique())  # pandas < 3 returned an ndarray
        np.random.seed(seed)
        np.random.shuffle(labels)
        label_folds = np.array_split(labels, num_folds)
        val_labels = label_folds.pop(val_fold)
        train_labels = np.concatenate(label_folds)
        df_val = df[df[label_key].isin(val_labels)].reset_index(drop=True).copy()
        df_train = df[df[label_key].isin(train_labels)].reset_index(drop=True)
    finally:
        np.random.set_state(state)
    return df_train, df_val


def _global_state_equal(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


# ---------------------------------------------------------------- k-fold


@pytest.mark.parametrize("int_labels", [False, True])
@pytest.mark.parametrize("num_folds,seed", [(5, 0), (3, 17), (4, 123456), (23, 2)])
def test_k_fold_equals_legacy_release(int_labels, num_folds, seed):
    df = _make_df(int_labels=int_labels)
    for val_fold in range(num_folds):
        got_train, got_val = k_fold_trainval_split(
            df, num_folds=num_folds, val_fold=val_fold, seed=seed
        )
        ref_train, ref_val = _legacy_k_fold(df, num_folds, val_fold, seed)
        pd.testing.assert_frame_equal(got_train, ref_train)
        pd.testing.assert_frame_equal(got_val, ref_val)


def test_k_fold_folds_depend_on_seed():
    df = _make_df()
    val_sets = {
        tuple(sorted(k_fold_trainval_split(df, seed=seed)[1]["label"].unique()))
        for seed in range(5)
    }
    assert len(val_sets) > 1


def test_k_fold_label_disjoint_and_complete():
    df = _make_df()
    num_folds = 5
    seen_rows = []
    for val_fold in range(num_folds):
        df_train, df_val = k_fold_trainval_split(df, num_folds=num_folds, val_fold=val_fold)
        assert set(df_train["label"]).isdisjoint(set(df_val["label"]))
        assert len(df_train) + len(df_val) == len(df)
        assert sorted(df_train["row_id"].tolist() + df_val["row_id"].tolist()) == list(
            range(len(df))
        )
        seen_rows.extend(df_val["row_id"].tolist())
    # Every row is in exactly one validation set.
    assert sorted(seen_rows) == list(range(len(df)))


def test_k_fold_sizes_follow_array_split():
    df = _make_df(num_labels=23)
    sizes = [
        df_val["label"].nunique()
        for df_val in (k_fold_trainval_split(df, 5, fold, seed=3)[1] for fold in range(5))
    ]
    # 23 labels in 5 folds: the first 23 % 5 = 3 folds get one label more.
    assert sizes == [5, 5, 5, 4, 4]


def test_k_fold_keeps_row_order_and_resets_index():
    df = _make_df()
    df.index = df.index * 7 + 100  # a non-default index
    df_train, df_val = k_fold_trainval_split(df, num_folds=3, val_fold=1, seed=9)
    for part in (df_train, df_val):
        assert part.index.tolist() == list(range(len(part)))
        assert part["row_id"].is_monotonic_increasing
    assert list(df.columns) == list(df_train.columns)


def test_k_fold_example_by_hand():
    # RandomState(0) shuffles 5 positions into [2, 0, 1, 3, 4]; labels in order
    # of first appearance are [b, a, e, c, d], so the shuffle gives
    # [e, b, a, c, d] and array_split(., 2) -> [e, b, a], [c, d].
    order = np.arange(5)
    np.random.RandomState(0).shuffle(order)
    assert order.tolist() == [2, 0, 1, 3, 4]
    df = pd.DataFrame({"label": ["b", "a", "b", "e", "c", "d", "a"], "x": range(7)})
    df_train, df_val = k_fold_trainval_split(df, num_folds=2, val_fold=0, seed=0)
    assert df_val["x"].tolist() == [0, 1, 2, 3, 6]
    assert df_train["x"].tolist() == [4, 5]


def test_splits_leave_global_rng_untouched():
    df = _make_df()
    np.random.seed(1234)
    before = np.random.get_state()
    k_fold_trainval_split(df, num_folds=4, val_fold=2, seed=77)
    split_gallery_query(df, num_refs=1, seed=77)
    assert _global_state_equal(before, np.random.get_state())


def test_k_fold_does_not_modify_input():
    df = _make_df()
    copy = df.copy()
    k_fold_trainval_split(df, num_folds=3)
    pd.testing.assert_frame_equal(df, copy)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_folds": 5, "val_fold": 5}, ValueError, r"val_fold must be in 0\.\.4.*got 5"),
        ({"num_folds": 5, "val_fold": -1}, ValueError, r"val_fold must be in 0\.\.4.*got -1"),
        ({"num_folds": 1, "val_fold": 0}, ValueError, r"num_folds must be at least 2.*got 1"),
        # More folds than labels is allowed (SPEC 1.2, as in the earlier release) unless the
        # validation fold is one of the empty ones.
        ({"num_folds": 24, "val_fold": 23}, ValueError, r"Validation fold 23 is empty: 23 labels.*num_folds=24"),
        ({"num_folds": 5.0}, TypeError, r"num_folds must be an integer.*5\.0"),
        ({"val_fold": True}, TypeError, r"val_fold must be an integer"),
        ({"seed": -1}, ValueError, r"seed must be >= 0"),
        ({"seed": 2**32}, ValueError, r"seed must be < 4294967296"),
        ({"label_key": "name"}, ValueError, r"'name' \(label_key\).*Available columns"),
    ],
)
def test_k_fold_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        k_fold_trainval_split(_make_df(num_labels=23), **kwargs)


def test_k_fold_accepts_numpy_integers():
    df = _make_df()
    got = k_fold_trainval_split(df, num_folds=np.int64(3), val_fold=np.int32(1), seed=np.uint8(4))
    ref = _legacy_k_fold(df, 3, 1, 4)
    pd.testing.assert_frame_equal(got[1], ref[1])


def test_splits_refuse_empty_df_and_missing_labels():
    empty = pd.DataFrame({"label": pd.Series([], dtype=str)})
    with pytest.raises(ValueError, match="no rows"):
        k_fold_trainval_split(empty)
    with pytest.raises(ValueError, match="no rows"):
        split_gallery_query(empty)
    df = pd.DataFrame({"label": ["a", None, "b", "c"]})
    with pytest.raises(ValueError, match="1 missing labels"):
        k_fold_trainval_split(df, num_folds=2)
    with pytest.raises(TypeError, match="pandas DataFrame"):
        split_gallery_query(["a", "b"])


# ---------------------------------------------------------------- gallery / query


def test_gallery_query_counts_per_label():
    # a: 5 rows, b: 3 rows, c: 2 rows (exactly num_refs), d: 1 row (too few).
    labels = ["a", "b", "a", "c", "d", "a", "b", "c", "a", "b", "a"]
    df = pd.DataFrame({"label": labels, "row_id": range(len(labels))})
    with pytest.warns(
        UserWarning,
        match=r"^1 labels did not contain enough reference candidates to select 2 "
        r"references for the gallery\.$",
    ) as record:
        df_gal, df_quer = split_gallery_query(df, num_refs=2, seed=3)
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1
    assert df_gal["label"].value_counts().to_dict() == {"a": 2, "b": 2, "c": 2, "d": 1}
    assert df_quer["label"].value_counts().to_dict() == {"a": 3, "b": 1}
    all_ids = df_gal["row_id"].tolist() + df_quer["row_id"].tolist()
    assert sorted(all_ids) == list(range(len(df)))
    for part in (df_gal, df_quer):
        assert part["row_id"].is_monotonic_increasing
        assert part.index.tolist() == list(range(len(part)))


def test_gallery_warning_counts_every_short_label_once():
    df = pd.DataFrame({"label": ["A", "B", "C", "D", "D", "E", "E", "E"]})
    with pytest.warns(
        UserWarning,
        match=r"^4 labels did not contain enough reference candidates to select 3 "
        r"references for the gallery\.$",
    ) as record:
        df_gal, df_quer = split_gallery_query(df, num_refs=3)
    assert len(record) == 1
    assert df_gal["label"].tolist() == ["A", "B", "C", "D", "D", "E", "E", "E"]
    assert len(df_quer) == 0


def test_gallery_no_warning_when_enough_rows():
    df = pd.DataFrame({"label": [1, 1, 2, 2, 2]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df_gal, df_quer = split_gallery_query(df, num_refs=2)
    assert df_gal["label"].tolist().count(1) == 2
    assert df_quer["label"].tolist() == [2]


def test_gallery_matches_documented_rule():
    """Per label, the num_refs rows with the smallest default_rng(seed) keys."""
    df = _make_df(num_labels=15, seed=11)
    num_refs, seed = 2, 42
    keys = np.random.default_rng(seed).random(len(df))
    expected = set()
    for _, group in df.groupby("label"):
        positions = group.index.to_numpy()
        expected.update(positions[np.argsort(keys[positions])][:num_refs].tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df_gal, _ = split_gallery_query(df, num_refs=num_refs, seed=seed)
    assert set(df_gal["row_id"]) == expected


def test_gallery_int_and_str_labels_give_same_choice():
    df_str = _make_df(seed=8)
    df_int = _make_df(seed=8, int_labels=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gal_str, quer_str = split_gallery_query(df_str, num_refs=2, seed=5)
        gal_int, quer_int = split_gallery_query(df_int, num_refs=2, seed=5)
    assert gal_str["row_id"].tolist() == gal_int["row_id"].tolist()
    assert quer_str["row_id"].tolist() == quer_int["row_id"].tolist()
    assert gal_int["label"].dtype.kind == "i"


def test_gallery_choice_is_seeded_and_varies():
    df = pd.DataFrame({"label": ["x"] * 20, "row_id": range(20)})
    first = split_gallery_query(df, num_refs=1, seed=0)[0]["row_id"].tolist()
    again = split_gallery_query(df, num_refs=1, seed=0)[0]["row_id"].tolist()
    assert first == again
    chosen = {split_gallery_query(df, num_refs=1, seed=s)[0]["row_id"].iloc[0] for s in range(10)}
    assert len(chosen) > 3


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_refs": 0}, ValueError, r"num_refs must be >= 1, got 0"),
        ({"num_refs": -2}, ValueError, r"num_refs must be >= 1, got -2"),
        ({"num_refs": 1.5}, TypeError, r"num_refs must be an integer.*1\.5"),
        ({"seed": "0"}, TypeError, r"seed must be an integer"),
        ({"seed": -3}, ValueError, r"seed must be >= 0"),
        ({"label_key": "lable"}, ValueError, r"Available columns.*Did you mean: 'label'"),
    ],
)
def test_gallery_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        split_gallery_query(_make_df(), **kwargs)


def test_more_folds_than_labels_warns_and_works_like_the_earlier_release():
    df = _make_df(num_labels=3)
    with pytest.warns(UserWarning, match=r"num_folds \(5\) is larger than the number of unique labels \(3\)"):
        df_train, df_val = k_fold_trainval_split(df, num_folds=5, val_fold=0)
    assert df_val["label"].nunique() == 1 and df_train["label"].nunique() == 2
    assert set(df_val["label"]).isdisjoint(df_train["label"])


def test_a_single_label_cannot_be_split_into_folds():
    with pytest.raises(ValueError, match="need at least 2 labels"):
        k_fold_trainval_split(_make_df(num_labels=1), num_folds=2)
