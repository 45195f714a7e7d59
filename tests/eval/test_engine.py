"""Private engine pieces: blocked passes and the word-wise threshold scan give the plain results."""

from __future__ import annotations

import pytest
import torch

from recognite.eval._engine import LabelIndex, Workspace, _sort_within_rows, chunk_stats, flat_nonzero


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
