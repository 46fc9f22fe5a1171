"""engine.kernels.reference.softmax_xent against torch's cross-entropy and autograd.

The reference computes in float32 whatever the logits' dtype (its documented contract), so
float64 inputs are held to float32 accuracy here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.errors import InvalidArgumentError
from engine.kernels.reference import EXP_FLOOR, softmax_xent


def _reference(logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index=-1):
    """float64 per-probe summed cross-entropy and its autograd gradient times ``scale``."""
    z = logits.detach().double().clone().requires_grad_()
    loss = torch.stack([F.cross_entropy(z[k], labels, reduction="sum", ignore_index=ignore_index)
                        for k in range(z.shape[0])])
    loss.sum().backward()
    return loss.detach(), z.grad * scale


def _hits(logits: torch.Tensor, labels: torch.Tensor, ignore_index=-1):
    """top-1 / top-5 hit counts per probe, from argmax and topk."""
    z = logits.double()
    keep = labels != ignore_index
    y = torch.where(keep, labels, 0)
    top1 = ((z.argmax(2) == y) & keep).sum(1)
    c = z.shape[2]
    if c > 5:
        in5 = (z.topk(5, dim=2).indices == y.view(1, -1, 1)).any(2)
        top5 = (in5 & keep).sum(1)
    else:
        top5 = keep.sum().expand(z.shape[0])
    return top1, top5


def _problem(k, b, c, dtype, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed + 1000 * c + 10 * b + k)
    logits = (spread * torch.randn(k, b, c, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, c, (b,), generator=gen)
    return logits, labels


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-6),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("b", [1, 7, 64])
@pytest.mark.parametrize("c", [2, 3, 10, 1000])
def test_matches_torch_cross_entropy_and_autograd(dtype, k, b, c):
    logits, labels = _problem(k, b, c, dtype)
    original = logits.clone()
    scale = 1.0 / (b + 0.5)
    want_loss, want_grad = _reference(original, labels, scale)
    want1, want5 = _hits(original, labels)

    g, loss, top1, top5 = softmax_xent(logits, labels, scale=scale)
    assert g is logits or g.data_ptr() == logits.data_ptr()  # written in place
    assert g.dtype == dtype and g.shape == (k, b, c)
    # float64 stays float64 end to end; narrower inputs are computed in float32
    wide = dtype == torch.float64
    assert loss.shape == (k,) and loss.dtype == (torch.float64 if wide else torch.float32)
    assert top1.dtype == torch.int64 and top5.dtype == torch.int64
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-12 if wide else 2e-6,
                               atol=1e-10 if wide else 1e-5)
    torch.testing.assert_close(logits.double(), want_grad, **TOL[dtype])
    # each row of the gradient sums to zero
    torch.testing.assert_close(logits.double().sum(2), torch.zeros(k, b, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert top1.tolist() == want1.tolist()
    assert top5.tolist() == want5.tolist()
    if c <= 5:
        assert top5.tolist() == [b] * k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16],
                         ids=["f32", "f64", "f16"])
def test_strided_logits_get_the_gradient_in_place(dtype):
    """(B, K, C) storage seen as (K, B, C), as the solver passes its (B, K*C) logits."""
    k, b, c = 3, 33, 12
    flat, _ = _problem(1, b, k * c, dtype, seed=5)
    labels = torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(5))
    base = flat[0].clone()  # (B, K*C)
    logits = base.view(b, k, c).transpose(0, 1)
    assert not logits.is_contiguous()
    want_loss, want_grad = _reference(logits.clone(), labels, 0.25)
    want1, want5 = _hits(logits.clone(), labels)

    g, loss, top1, top5 = softmax_xent(logits, labels, scale=0.25)
    assert g.data_ptr() == base.data_ptr()
    torch.testing.assert_close(base.view(b, k, c).transpose(0, 1).double(), want_grad,
                               **TOL[dtype])
    torch.testing.assert_close(g.double(), want_grad, **TOL[dtype])
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-6, atol=1e-4)
    if dtype != torch.float16:  # float16 logits may tie
        assert top1.tolist() == want1.tolist() and top5.tolist() == want5.tolist()


def test_float16_logits_are_read_in_float32():
    logits, labels = _problem(2, 50, 20, torch.float16, seed=2)
    want_loss, want_grad = _reference(logits, labels, 0.1)  # exact upcast of the same values
    g, loss, _, _ = softmax_xent(logits, labels, scale=0.1)
    assert g.dtype == torch.float16 and g.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(g.double(), want_grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("ignore_index", [-1, -100])
@pytest.mark.parametrize("c", [4, 50])
def test_ignored_rows_count_for_nothing(ignore_index, c):
    k, b = 2, 40
    logits, labels = _problem(k, b, c, torch.float32, seed=3)
    labels[::3] = ignore_index
    kept = int((labels != ignore_index).sum())
    want_loss, want_grad = _reference(logits, labels, 0.5, ignore_index)
    want1, want5 = _hits(logits, labels, ignore_index)

    g, loss, top1, top5 = softmax_xent(logits, labels, scale=0.5, ignore_index=ignore_index)
    assert (g[:, ::3] == 0).all()
    assert (g[:, 1::3] != 0).any()
    torch.testing.assert_close(g.double(), want_grad, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-6, atol=1e-5)
    assert top1.tolist() == want1.tolist() and top5.tolist() == want5.tolist()
    assert (top5 <= kept).all()
    if c <= 5:
        assert top5.tolist() == [kept] * k

    # only ignored rows: nothing at all
    all_ignored = torch.full((b,), ignore_index)
    g, loss, top1, top5 = softmax_xent(torch.randn(k, b, c), all_ignored,
                                       ignore_index=ignore_index)
    assert (g == 0).all() and (loss == 0).all() and (top1 == 0).all() and (top5 == 0).all()


def test_without_grad_logits_stay_unchanged():
    for dtype in (torch.float32, torch.float64, torch.float16):
        logits, labels = _problem(3, 20, 7, dtype, seed=4)
        before = logits.clone()
        want_loss, _ = _reference(logits, labels, 1.0)
        g, loss, top1, top5 = softmax_xent(logits, labels, grad=False)
        assert g is None
        assert torch.equal(logits, before)
        torch.testing.assert_close(loss.double(), want_loss, rtol=2e-6, atol=1e-4)
        # the same loss and hits as with grad
        _, loss2, top1b, top5b = softmax_xent(logits.clone(), labels)
        assert torch.equal(loss, loss2) and torch.equal(top1, top1b) and torch.equal(top5, top5b)


def test_scale_only_scales_the_gradient():
    logits, labels = _problem(2, 16, 9, torch.float32, seed=6)
    g1, l1, _, _ = softmax_xent(logits.clone(), labels)
    g2, l2, _, _ = softmax_xent(logits.clone(), labels, scale=-3.0)
    assert torch.equal(l1, l2)
    torch.testing.assert_close(g2, -3.0 * g1)
    # default scale 1: softmax minus one-hot
    want = torch.softmax(logits, dim=2) - F.one_hot(labels, 9).float()
    torch.testing.assert_close(g1, want, rtol=1e-5, atol=1e-6)


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-3e4, 3e4, 1.0]]])
    labels = torch.tensor([1, 1])
    g, loss, top1, _ = softmax_xent(logits, labels)
    assert torch.isfinite(g).all() and torch.isfinite(loss).all()
    assert float(loss[0]) == pytest.approx(2e4, rel=1e-6)  # row 0 only
    assert top1.tolist() == [1]


def test_bad_shapes_are_value_errors():
    with pytest.raises(InvalidArgumentError, match=r"\(K, B, C\)"):
        softmax_xent(torch.randn(5, 3), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(InvalidArgumentError, match=r"\(K, B, C\)"):
        softmax_xent(torch.randn(1, 2, 5, 3), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(InvalidArgumentError, match="labels"):
        softmax_xent(torch.randn(2, 5, 3), torch.zeros(6, dtype=torch.int64))
    with pytest.raises(InvalidArgumentError, match="labels"):
        softmax_xent(torch.randn(2, 5, 3), torch.zeros(5, 1, dtype=torch.int64))


class _SoftmaxXent(torch.autograd.Function):
    """Summed cross-entropy of (K, B, C) logits; backward: softmax_xent's gradient with
    ``scale=grad_output``. The forward value is computed in float64 torch: softmax_xent's own
    loss is float32, too coarse for float64 finite differences (checked against it below)."""

    @staticmethod
    def forward(ctx, logits, labels):
        ctx.save_for_backward(logits, labels)
        z = logits.detach()
        picked = z.gather(2, labels.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(2)
        return (torch.logsumexp(z, dim=2) - picked).sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels = ctx.saved_tensors
        g, _, _, _ = softmax_xent(logits.detach().clone(), labels, scale=float(grad_out))
        return g, None


def test_gradcheck():
    gen = torch.Generator().manual_seed(0)
    for k, b, c in ((1, 5, 2), (2, 7, 6), (3, 4, 11)):
        logits = torch.randn(k, b, c, dtype=torch.float64, generator=gen, requires_grad=True)
        labels = torch.randint(0, c, (b,), generator=gen)
        assert torch.autograd.gradcheck(lambda z, y=labels: _SoftmaxXent.apply(z, y), (logits,))
        _, loss, _, _ = softmax_xent(logits.detach().clone(), labels, grad=False)
        value = _SoftmaxXent.apply(logits, labels).detach()
        assert float(loss.sum()) == pytest.approx(float(value), rel=1e-6)


def test_without_hits_the_counts_are_skipped_and_nothing_else_changes():
    logits, labels = _problem(3, 64, 1000, torch.float32)
    labels[::5] = -1
    g_all, loss_all, top1, top5 = softmax_xent(logits.clone(), labels, scale=0.1)
    g, loss, none1, none5 = softmax_xent(logits.clone(), labels, scale=0.1, hits=False)
    assert none1 is None and none5 is None
    torch.testing.assert_close(loss, loss_all, rtol=0, atol=0)
    torch.testing.assert_close(g, g_all, rtol=0, atol=0)
    want1, want5 = _hits(logits, labels)
    assert torch.equal(top1, want1) and torch.equal(top5, want5)


def test_each_row_of_the_gradient_sums_to_zero_to_float32_rounding():
    # wide logits make the log-sum-exp large: a gradient taken as exp(z - lse) inherits
    # lse's rounding in every entry, and its rows drift off zero by about C of those
    logits, labels = _problem(2, 256, 1000, torch.float32, spread=30.0)
    logits += 200.0
    g, *_ = softmax_xent(logits, labels, scale=1.0)
    assert float(g.double().sum(dim=2).abs().max()) < 1e-6  # exp(z - lse): 1.5e-5


def test_terms_far_below_the_row_max_are_floored_not_denormal():
    # exp(z - m) under e^-87 is a float32 denormal (tens of times slower on x86, and in the
    # gradient's GEMM): the exponent is floored at EXP_FLOOR, at no cost in accuracy
    logits, labels = _problem(2, 64, 1000, torch.float32, spread=40.0)  # gaps of hundreds
    scale = 1e-6  # N = 1M rows
    m = logits.amax(dim=2, keepdim=True)
    plain = (logits - m).exp()
    plain = plain / plain.sum(dim=2, keepdim=True) * scale
    tiny = torch.finfo(torch.float32).tiny
    assert ((plain != 0) & (plain.abs() < tiny)).float().mean() > 0.05  # what is avoided
    want_loss, want_grad = _reference(logits, labels, scale)
    g, loss, _, _ = softmax_xent(logits, labels, scale=scale, hits=False)
    assert not ((g != 0) & (g.abs() < tiny)).any()
    assert float(g.abs().min()) >= math.exp(EXP_FLOOR) / 1000 * scale * 0.99
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(g.double(), want_grad, rtol=2e-5, atol=1e-30)
