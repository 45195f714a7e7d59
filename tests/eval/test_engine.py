"""Private engine pieces: blocked passes and the word-wise threshold scan give the plain results."""

from __future__ import annotations

import pytest
import torch

from recognite.eval._engine import LabelIndex, Workspace, _nonzero_ge, chunk_stats


@pytest.mark.parametrize("num_cols", [1, 7, 8, 41, 1000])
def test_nonzero_ge_equals_torch_nonzero(num_cols):
    gen = torch.Generator().manual_seed(num_cols)
    block = torch.round(torch.randn(13, num_cols, generator=gen) * 2) / 2  # many ties
    thresholds = torch.round(torch.randn(13, generator=gen) * 2) / 2 + 1.0
    thresholds[3] = float("inf")  # a row with nothing picked
    expected = torch.nonzero(block >= thresholds.unsqueeze(1))
    assert torch.equal(_nonzero_ge(block, thresholds, Workspace()), expected)
    assert torch.equal(_nonzero_ge(block, thresholds, Workspace(block_bytes=1)), expected)


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
