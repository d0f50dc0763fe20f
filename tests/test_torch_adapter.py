"""fusedce.torch against PyTorch's own functions and torch.autograd.gradcheck."""

from __future__ import annotations

import pytest

from optional import need

torch = need("torch")
import fusedce.torch as fce  # noqa: E402
from fusedce import TokenStats  # noqa: E402

F = torch.nn.functional
GEN = torch.Generator().manual_seed(0)


def _randn(*shape, dtype=torch.float32, scale=2.0):
    return (torch.randn(*shape, generator=GEN, dtype=torch.float64) * scale).to(dtype)


def _tol(dtype):
    return dict(float32=(2e-5, 2e-6), float64=(1e-12, 1e-13), float16=(4e-3, 2e-3),
                bfloat16=(2e-2, 2e-2))[str(dtype).split(".")[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,kw", [
    ((37, 50), dict()),
    ((37, 50), dict(reduction="sum", label_smoothing=0.1)),
    ((37, 50), dict(reduction="none", ignore_index=3)),
    ((50,), dict()),
    ((5, 11, 3, 4), dict(reduction="none", label_smoothing=0.2)),
    ((5, 11, 3, 4), dict(reduction="mean", weighted=True)),
])
def test_cross_entropy_matches_pytorch(dtype, shape, kw):
    kw = dict(kw)
    weight = torch.rand(shape[0] if len(shape) == 1 else shape[1], generator=GEN).to(dtype) if kw.pop("weighted", False) else None
    c = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    target = torch.randint(0, c, tshape, generator=GEN)
    x = _randn(*shape, dtype=dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = F.cross_entropy(a, target, weight, **kw)
    got = fce.cross_entropy(b, target, weight, **kw)
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    up = torch.rand(want.shape, generator=GEN).to(dtype) + 0.5
    want.backward(up)
    got.backward(up)
    torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_cross_entropy(reduction):
    x = _randn(6, 9, dtype=torch.float64).requires_grad_()
    t = torch.randint(0, 9, (6,), generator=GEN)
    assert torch.autograd.gradcheck(lambda x: fce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1,
                                                                 softcap=5.0, z_loss=1e-3), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(), dict(reduction="sum", label_smoothing=0.1), dict(reduction="none", ignore_index=2)])
def test_linear_cross_entropy_matches_pytorch(dtype, kw):
    x = _randn(40, 24, dtype=dtype, scale=1.0)
    w = _randn(70, 24, dtype=dtype, scale=0.2)
    b = _randn(70, dtype=dtype, scale=0.2)
    t = torch.randint(0, 70, (40,), generator=GEN)
    ins = [(x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()) for _ in range(2)]
    want = F.linear_cross_entropy(ins[0][0], ins[0][1], t, linear_bias=ins[0][2], **kw)
    got = fce.linear_cross_entropy(ins[1][0], ins[1][1], t, linear_bias=ins[1][2], **kw)
    rtol, atol = _tol(dtype) if dtype != torch.float32 else (1e-4, 1e-5)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    up = torch.rand(want.shape, generator=GEN).to(dtype) + 0.5
    want.backward(up)
    got.backward(up)
    for g, r in zip(ins[1], ins[0]):
        torch.testing.assert_close(g.grad, r.grad, rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_linear_cross_entropy(reduction):
    x = _randn(5, 4, dtype=torch.float64, scale=1.0).requires_grad_()
    w = _randn(7, 4, dtype=torch.float64, scale=0.5).requires_grad_()
    b = _randn(7, dtype=torch.float64, scale=0.5).requires_grad_()
    t = torch.randint(0, 7, (5,), generator=GEN)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fce.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.2),
        (x, w, b))


def test_gradcheck_token_stats_and_linear_token_stats():
    x = _randn(5, 8, dtype=torch.float64).requires_grad_()
    t = torch.randint(0, 8, (5,), generator=GEN)

    def stats(x):
        s = fce.token_stats(x, t, temperature=0.7, softcap=6.0, top_k=2)
        return s.logprob, s.entropy

    assert torch.autograd.gradcheck(stats, (x,))
    h = _randn(5, 3, dtype=torch.float64, scale=1.0).requires_grad_()
    w = _randn(8, 3, dtype=torch.float64, scale=0.7).requires_grad_()

    def linear_stats(h, w):
        s = fce.linear_token_stats(h, w, t, temperature=1.3)
        return s.logprob, s.entropy

    assert torch.autograd.gradcheck(linear_stats, (h, w))


def test_token_stats_match_pytorch_and_carry_no_grad_on_indices():
    x = _randn(9, 30).requires_grad_()
    t = torch.randint(0, 30, (9,), generator=GEN)
    s = fce.token_stats(x, t, top_k=3)
    assert isinstance(s, TokenStats)
    logp = F.log_softmax(x.detach(), -1)
    torch.testing.assert_close(s.logprob, logp.gather(1, t[:, None])[:, 0])
    torch.testing.assert_close(s.entropy, -(logp.exp() * logp).sum(-1))
    torch.testing.assert_close(s.topk_ids, logp.topk(3).indices)
    assert s.logprob.requires_grad and not s.argmax.requires_grad and not s.topk_ids.requires_grad
    (s.logprob.sum() + 0.1 * s.entropy.sum()).backward()
    xr = x.detach().clone().requires_grad_()
    lp = F.log_softmax(xr, -1)
    (lp.gather(1, t[:, None]).sum() + 0.1 * -(lp.exp() * lp).sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_a_second_backward_raises_unless_the_graph_is_retained():
    x = _randn(8, 20).requires_grad_()
    t = torch.randint(0, 20, (8,), generator=GEN)
    loss = fce.cross_entropy(x, t)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    x.grad = None
    loss = fce.linear_cross_entropy(x, _randn(20, 20).requires_grad_(), t)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_drop_in_for_a_training_step():
    # plain SGD by hand: torch.optim imports triton, whose LLVM crashes a
    # process that already loaded Mesa's (the lavapipe GPU tests run first)
    torch.manual_seed(3)
    models = [torch.nn.Linear(16, 40) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(64, 16)
    t = torch.randint(0, 40, (64,))
    for model, ce in zip(models, (F.cross_entropy, fce.cross_entropy)):
        for _ in range(5):
            model.zero_grad()
            ce(model(x), t, label_smoothing=0.05).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_no_grad_skips_the_gradient_and_errors_name_the_argument():
    x = _randn(4, 6).requires_grad_()
    t = torch.randint(0, 6, (4,), generator=GEN)
    with torch.no_grad():
        assert not fce.cross_entropy(x, t).requires_grad
    with pytest.raises(NotImplementedError, match="weight"):
        fce.cross_entropy(x, t, torch.rand(6, requires_grad=True))
    with pytest.raises(TypeError, match="size_average"):
        fce.cross_entropy(x, t, None, True)
    with pytest.raises(TypeError, match="return_grad"):
        fce.token_stats(x, t, return_grad=True)
    with pytest.raises(IndexError):
        fce.cross_entropy(x, torch.full((4,), 9))
