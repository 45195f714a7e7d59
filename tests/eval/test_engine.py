"""Private engine pieces: blocked passes and the word-wise threshold scan give the plain results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recognite.eval._engine import (
    LabelIndex,
    Workspace,
    _sort_within_rows,
    chunk_stats,
    flat_nonzero,
)


@pytest.mark.parametrize("num_cols", [1, 7, 8, 41, 1000])
def test_flat_nonzero_equals_torch_nonzero(num_cols):
    gen = torch.Generator().manual_seed(num_cols)
    flags = torch.randn(13, num_cols, generator=gen) > 0.5
    flags[3] = False  # a row with nothing picked
    assert torch.equal(flat_nonzero(flags), torch.nonzero(flags.reshape(-1)).squeeze(1))
    assert flat_nonzero(torch.zeros(0, dtype=torch.bool)).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sort_within_rows_orders_by_row_then_score(dtype):
    special = [0.5, -0.0, 0.0, -1.5, 3.0, float("inf"), float("-inf"), 1e-40, -1e-40, 2.0, 2.0, -3e38]
    gen = torch.Generator().manual_seed(0)
    value = torch.cat([torch.tensor(special), torch.round(torch.randn(200, generator=gen) * 3) / 3]).to(dtype)
    row_of = torch.sort(torch.randint(0, 9, (value.numel(),), generator=gen)).values
    is_pos = torch.rand(value.numel(), generator=gen) > 0.7
    got_value, got_pos = _sort_within_rows(row_of, value, is_pos)
    for row in range(9):
        mine = row_of == row
        expected = torch.sort(value[mine]).values
        assert torch.equal(got_value[mine], expected)
        # positives travel with their scores: per distinct score, as many positives as before
        for score in expected.unique():
            assert int((got_pos[mine] & (got_value[mine] == score)).sum()) == int((is_pos[mine] & (value[mine] == score)).sum())


@pytest.mark.parametrize("curves", [False, True])
def test_chunk_stats_do_not_depend_on_block_size_or_memory_budget(curves):
    gen = torch.Generator().manual_seed(5)
    scores = torch.round(torch.randn(23, 300, generator=gen) * 4) / 4
    gallery_labels = torch.randint(0, 40, (300,), generator=gen)
    query_labels = torch.randint(0, 44, (23,), generator=gen)  # 40..43: no positives
    index = LabelIndex(gallery_labels)
    reference = chunk_stats(scores, index, query_labels, ks=(1, 5), curves=curves)
    for block_bytes, budget in [(1, 256 * 1024**2), (4096, 500), (10**9, 64)]:
        got = chunk_stats(scores, index, query_labels, ks=(1, 5), memory_budget=budget, curves=curves,
                          workspace=Workspace(block_bytes=block_bytes))
        assert got.keys() == reference.keys()
        for key, value in reference.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(torch.nan_to_num(got[key], nan=-1.0), torch.nan_to_num(value, nan=-1.0)), key
            else:
                assert len(got[key]) == len(value) and all(torch.equal(a, b) for a, b in zip(got[key], value)), key


# --- the CPU engine (NumPy blocks in a thread pool) against the torch operations -----------------

FLAG_SETS = [  # (ranks, curves, need_max_neg, need_first_rank)
    (False, False, True, True), (False, False, False, True), (False, False, True, False),
    (True, False, True, True), (True, False, False, False), (True, True, False, False), (True, True, True, True),
]


def _problem(seed: int, dtype: torch.dtype, num_queries: int = 29, num_gallery: int = 310, num_labels: int = 37):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.round(torch.randn(num_queries, num_gallery, generator=gen) * 3) / 3  # many ties
    scores[::4] = torch.randn(len(scores[::4]), num_gallery, generator=gen)  # and rows without ties
    scores[1, :40] = torch.tensor([0.0, -0.0] * 20)  # +0.0 and -0.0 are one score
    gallery_labels = torch.randint(0, num_labels, (num_gallery,), generator=gen)
    gallery_labels[:60] = 0  # a label with 60 positives (wider than the counting limit)
    query_labels = torch.randint(0, num_labels + 4, (num_queries,), generator=gen)  # some without positives
    query_labels[2] = 0
    return scores.to(dtype), gallery_labels, query_labels


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(torch.nan_to_num(got[key].double(), nan=-7.0), torch.nan_to_num(value.double(), nan=-7.0)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("flags", FLAG_SETS)
def test_cpu_engine_equals_the_torch_operations(dtype, flags):
    ranks, curves, need_max_neg, need_first_rank = flags
    scores, gallery_labels, query_labels = _problem(int(dtype.itemsize), dtype)
    index = LabelIndex(gallery_labels)
    kwargs = dict(ks=(1, 3, 50), ranks=ranks, curves=curves, need_max_neg=need_max_neg, need_first_rank=need_first_rank)
    expected = chunk_stats(scores, index, query_labels, backend="torch", **kwargs)
    _assert_same(chunk_stats(scores, index, query_labels, **kwargs), expected)


@pytest.mark.parametrize("sort_cost", [0, 10**9])  # always sort / count whenever allowed
def test_cpu_engine_counting_and_sorting_give_the_same_counts(monkeypatch, sort_cost):
    import recognite.eval._rows_cpu as rows_cpu

    scores, gallery_labels, query_labels = _problem(3, torch.float32)
    index = LabelIndex(gallery_labels)
    expected = chunk_stats(scores, index, query_labels, ks=(1, 4), backend="torch")
    monkeypatch.setattr(rows_cpu, "_SORT_COST", sort_cost)
    _assert_same(chunk_stats(scores, index, query_labels, ks=(1, 4)), expected)


@pytest.mark.parametrize("curves", [False, True])
def test_cpu_engine_does_not_depend_on_blocks_or_workers(curves):
    from recognite.eval._rows_cpu import cpu_chunk_stats

    scores, gallery_labels, query_labels = _problem(4, torch.float32, num_queries=41)
    index = LabelIndex(gallery_labels)
    args = (scores, index.sorted_labels, index.order, query_labels, (1, 5), True, curves, True, True)
    expected = chunk_stats(scores, index, query_labels, ks=(1, 5), curves=curves, backend="torch")
    for block_bytes, workers in [(1, 1), (1, 3), (4 * 310 * 7, 2), (10**9, 2)]:  # 1 row, 7 rows, all rows
        _assert_same(cpu_chunk_stats(*args, block_bytes=block_bytes, workers=workers), expected)


def test_cpu_engine_single_item_gallery_and_single_query():
    for scores, gallery_labels, query_labels in [
        (torch.tensor([[0.5], [0.2]]), torch.tensor([1]), torch.tensor([1, 2])),
        (torch.tensor([[0.5, 0.5, -1.0]]), torch.tensor([3, 4, 3]), torch.tensor([3])),
    ]:
        index = LabelIndex(gallery_labels)
        expected = chunk_stats(scores, index, query_labels, ks=(1, 2), curves=True, backend="torch")
        _assert_same(chunk_stats(scores, index, query_labels, ks=(1, 2), curves=True), expected)


def test_cpu_engine_by_hand():
    # one query (label 1): items by score 0.9 (neg), 0.8 (pos), 0.8 (neg), 0.3 (pos), 0.1 (neg)
    scores = torch.tensor([[0.8, 0.9, 0.3, 0.8, 0.1]])
    gallery_labels = torch.tensor([1, 2, 1, 3, 4])
    out = chunk_stats(scores, LabelIndex(gallery_labels), torch.tensor([1]), ks=(1, 3), curves=True)
    assert out["first_rank"].tolist() == [3]  # pessimistic: both negatives >= 0.8 come first
    assert out["max_neg"].tolist() == [pytest.approx(0.9)]
    # AP = mean over positives of positives>=s / items>=s = (1/3 + 2/4) / 2
    assert out["ap"].tolist() == [pytest.approx((1 / 3 + 2 / 4) / 2)]
    assert out["recall_hits"].tolist() == [[0, 1]]
    # points at 0.3, 0.8, 0.9 (increasing threshold), then the end point
    assert out["curve_counts"].tolist() == [3]
    assert out["curve_precisions"].tolist() == pytest.approx([2 / 4, 1 / 3, 0.0, 1.0])
    assert out["curve_recalls"].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert out["curve_thresholds"].tolist() == pytest.approx([0.3, 0.8, 0.9])
    assert out["max_f1"].tolist() == pytest.approx([2 * 0.5 * 1.0 / 1.5])


def test_cpu_engine_rejects_non_finite_scores_in_any_block():
    from recognite.eval._rows_cpu import cpu_chunk_stats

    scores = torch.randn(30, 20)
    scores[27, 3] = float("nan")
    index = LabelIndex(torch.arange(20) % 4)
    with pytest.raises(ValueError, match="scores must be finite"):
        cpu_chunk_stats(scores, index.sorted_labels, index.order, torch.zeros(30, dtype=torch.long), (1,),
                        True, False, True, True, block_bytes=80, workers=2)


def test_run_blocks_keeps_block_order_and_honours_the_worker_count():
    import threading

    from recognite.eval._rows_cpu import run_blocks

    threads_before = torch.get_num_threads()
    seen = []

    def work(start, stop):
        seen.append(threading.current_thread().name)
        return {"rows": np.arange(start, stop)}

    parts = run_blocks(work, 23, 4, workers=1)
    assert np.concatenate([p["rows"] for p in parts]).tolist() == list(range(23))
    assert set(seen) == {threading.current_thread().name}  # one worker: the calling thread
    seen.clear()
    parts = run_blocks(work, 23, 4, workers=2)
    assert np.concatenate([p["rows"] for p in parts]).tolist() == list(range(23))
    assert all(name.startswith("recognite-eval") for name in seen) and len(seen) == 6
    assert torch.get_num_threads() == threads_before  # the library never changes it


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_float32_curves_are_the_float64_curves_rounded_once(backend):
    scores, gallery_labels, query_labels = _problem(6, torch.float32)
    index = LabelIndex(gallery_labels)
    wide = chunk_stats(scores, index, query_labels, curves=True, backend=backend)
    narrow = chunk_stats(scores, index, query_labels, curves=True, backend=backend, curve_dtype=torch.float32)
    for key in ("curve_precisions", "curve_recalls"):
        assert narrow[key].dtype == torch.float32
        assert torch.equal(narrow[key], wide[key].to(torch.float32)), key
