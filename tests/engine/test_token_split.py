"""TokenSplit's split and merge: the rows of each token set, and back in token order with zeros
at skipped rows; values and gradients bit for bit those of the plain gathers, cat and
index_select they replace."""

from __future__ import annotations

import pytest
import torch

from sparselora.engine.state import TokenSplit


def plain_merge(split: TokenSplit, y_sparse, y_dense):
    parts = [y_sparse, y_dense, y_dense.new_zeros(split.skip_rows.numel(), y_dense.shape[1])]
    return torch.cat(parts).index_select(0, split.inverse)


def make_split(skip: bool) -> TokenSplit:
    sparse = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    skipped = torch.tensor([[0, 0, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return TokenSplit(sparse, skipped if skip else None)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("column_major", [False, True])  # frozen_linear's transposed output
def test_split_then_merge_equals_the_plain_gathers_and_permutation(skip, column_major):
    split = make_split(skip)
    torch.manual_seed(0)
    flat = torch.randn(10, 6, requires_grad=True)
    w_sparse, w_dense = torch.randn(6, 4), torch.randn(4, 6)
    grad_out = torch.randn(10, 4)

    def run(split_fn, merge_fn):
        x_sparse, x_dense = split_fn(flat)
        y_sparse = x_sparse @ w_sparse
        y_dense = (w_dense @ x_dense.t()).t() if column_major else x_dense @ w_dense.t()
        y = merge_fn(y_sparse, y_dense)
        (grad,) = torch.autograd.grad(y, flat, grad_out)
        return y, grad

    y, grad = run(split.split, split.merge)
    y_ref, grad_ref = run(
        lambda f: (f.index_select(0, split.sparse_rows), f.index_select(0, split.dense_rows)),
        lambda a, b: plain_merge(split, a, b),
    )
    assert torch.equal(y, y_ref) and y.is_contiguous()
    assert torch.equal(grad, grad_ref)
    if skip:
        assert y[split.skip_rows].abs().sum() == 0 and grad[split.skip_rows].abs().sum() == 0


def test_an_unused_set_gets_a_zero_gradient_and_a_frozen_one_none():
    split = make_split(skip=True)
    flat = torch.randn(10, 3, requires_grad=True)
    x_sparse, x_dense = split.split(flat)
    (grad,) = torch.autograd.grad(x_dense.sum(), flat)  # the sparse rows are not used
    expected = torch.zeros(10, 3)
    expected[split.dense_rows] = 1.0
    assert torch.equal(grad, expected)

    y_dense = torch.randn(split.dense_rows.numel(), 3, requires_grad=True)
    y_sparse = torch.randn(split.sparse_rows.numel(), 3)  # no gradient wanted
    y = split.merge(y_sparse, y_dense)
    (g_dense,) = torch.autograd.grad(y.sum(), y_dense)
    assert torch.equal(g_dense, torch.ones_like(y_dense))


def test_mixed_dtypes_merge_as_cat_promotes_them():
    split = make_split(skip=False)
    y_sparse = torch.randn(split.sparse_rows.numel(), 2, dtype=torch.bfloat16)
    y_dense = torch.randn(split.dense_rows.numel(), 2)
    y = split.merge(y_sparse, y_dense)
    assert y.dtype == torch.float32
    assert torch.equal(y, plain_merge(split, y_sparse.float(), y_dense))
