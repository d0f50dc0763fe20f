"""Makes the token-statistics and softcap/z-loss conformance cases
(``cases.json`` + ``cases.npz`` beside this file) with PyTorch, in float64
from the stored inputs. Run where PyTorch is installed:

    python tests/data/stats/make_cases.py

Each case: ``fn`` (``token_stats`` or ``cross_entropy``), ``kwargs``, array
references ``{"key", "dtype"}`` as in ``tests/data`` (bfloat16 stored as its
uint16 bits), and the expected outputs. The order statistics (argmax, rank,
top-k) are those of the stored logits; the data has no ties, so PyTorch's
``topk`` order is unambiguous.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

HERE = Path(__file__).parent
SEED = 20261124


def store(arrays, key, a):
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        arrays[key] = a.view(np.uint16)
        return {"key": key, "dtype": "bfloat16"}
    arrays[key] = a
    return {"key": key, "dtype": str(a.dtype)}


def scores(x, temperature, softcap):
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    return z / temperature


def stats_case(rng, arrays, cid, shape, dtype, temperature, softcap, top_k, masked, ignore):
    x = (rng.normal(size=shape) * 4).astype(dtype)
    if masked:
        x[(rng.random(size=shape) < 0.2)] = -np.inf
        x.reshape(-1)[0] = 1.0  # every row keeps a finite entry (no all-masked row)
    c = shape[1] if len(shape) > 1 else shape[0]
    per_token = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = rng.integers(0, c, size=per_token)
    if ignore and t.size:
        t = np.where(rng.random(size=per_token) < 0.25, -100, t)
    gl = rng.normal(size=per_token)
    ge = rng.normal(size=per_token)
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    xc = xt if len(shape) > 1 else xt[None]
    xm = torch.movedim(xc, 1, -1)  # (N, d..., C)
    z = scores(xm, temperature, softcap)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    # lse - sum(p z), a masked class (z = -inf, p = 0) contributing 0 (and
    # no NaN to the gradient: the -inf branch of `where` gets none)
    ent = torch.logsumexp(z, -1) - (p * torch.where(p > 0, z, torch.zeros_like(z))).sum(-1)
    tt = torch.tensor(t).reshape(xm.shape[:-1])
    keep = tt != -100
    ys = torch.where(keep, tt, torch.zeros_like(tt))
    lp = torch.where(keep, logp.gather(-1, ys[..., None])[..., 0], torch.zeros(()))
    glt = torch.tensor(gl).reshape(xm.shape[:-1])
    get = torch.tensor(ge).reshape(xm.shape[:-1])
    (glt * lp + get * ent).sum().backward()
    raw = xm.detach()
    ry = raw.gather(-1, ys[..., None])
    rank = torch.where(keep, (raw > ry).sum(-1), torch.full_like(tt, -1))
    top = torch.topk(raw, top_k, -1) if top_k else None
    lse = torch.logsumexp(z, -1)
    squeeze = (lambda a: a[0]) if len(shape) == 1 else (lambda a: a)
    out = {
        "lse": squeeze(lse), "logprob": squeeze(lp), "entropy": squeeze(ent),
        "argmax": squeeze(torch.argmax(raw, -1)), "rank": squeeze(rank),
    }
    if top is not None:
        out["topk_ids"] = squeeze(top.indices)
        out["topk_logprobs"] = squeeze(logp.gather(-1, top.indices))
    case = {
        "id": cid, "fn": "token_stats",
        "kwargs": {"temperature": temperature, "softcap": softcap, "top_k": top_k, "ignore_index": -100},
        "input": store(arrays, f"{cid}/input", x), "target": store(arrays, f"{cid}/target", t),
        "grad_logprob": store(arrays, f"{cid}/grad_logprob", gl),
        "grad_entropy": store(arrays, f"{cid}/grad_entropy", ge),
        "grad_input": store(arrays, f"{cid}/grad_input", xt.grad.numpy()),
    }
    for k, v in out.items():
        case[k] = store(arrays, f"{cid}/{k}", v.detach().numpy())
    return case


def loss_case(rng, arrays, cid, shape, dtype, softcap, z_loss, reduction, ls):
    x = (rng.normal(size=shape) * 4).astype(dtype)
    c = shape[1] if len(shape) > 1 else shape[0]
    per_token = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = np.where(rng.random(size=per_token) < 0.2, -100, rng.integers(0, c, size=per_token))
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    z = xt if softcap is None else softcap * torch.tanh(xt / softcap)
    tt = torch.tensor(t)
    per = torch.nn.functional.cross_entropy(z, tt, reduction="none", label_smoothing=ls)
    keep = (tt != -100).to(torch.float64)
    lse = torch.logsumexp(z, 1 if len(shape) > 1 else 0)
    per = per + z_loss * lse**2 * keep
    loss = {"none": per, "sum": per.sum(), "mean": per.sum() / keep.sum()}[reduction]
    loss.sum().backward()
    return {
        "id": cid, "fn": "cross_entropy",
        "kwargs": {"softcap": softcap, "z_loss": z_loss, "reduction": reduction, "label_smoothing": ls},
        "input": store(arrays, f"{cid}/input", x), "target": store(arrays, f"{cid}/target", t),
        "loss": store(arrays, f"{cid}/loss", loss.detach().numpy()),
        "grad_input": store(arrays, f"{cid}/grad_input", xt.grad.numpy()),
    }


def main():
    rng = np.random.default_rng(SEED)
    arrays, cases = {}, []
    dtypes = [np.float32, np.float64, ml_dtypes.bfloat16]
    i = 0
    for shape, dts in [((7,), dtypes), ((5, 13), dtypes), ((4, 300), dtypes), ((3, 9, 2, 3), dtypes),
                       ((1, 50000), [np.float32])]:
        for dtype in dts:
            for temperature, softcap, top_k, masked in [(1.0, None, 0, False), (0.7, 5.0, 3, True),
                                                        (1.5, None, 1, True)]:
                i += 1
                cases.append(stats_case(rng, arrays, f"ts{i:04d}", shape, dtype, temperature, softcap,
                                        min(top_k, shape[1] if len(shape) > 1 else shape[0]), masked, True))
    j = 0
    for shape in [(6,), (8, 11), (3, 7, 4)]:
        for dtype in dtypes:
            for softcap, z_loss, reduction, ls in [(3.0, 0.0, "mean", 0.0), (None, 1e-2, "sum", 0.1),
                                                   (10.0, 1e-3, "none", 0.0)]:
                j += 1
                cases.append(loss_case(rng, arrays, f"sz{j:04d}", shape, dtype, softcap, z_loss, reduction, ls))
    np.savez_compressed(HERE / "cases.npz", **arrays)
    meta = {"generator": f"tests/data/stats/make_cases.py, torch {torch.__version__}", "seed": SEED,
            "cases": cases}
    (HERE / "cases.json").write_text(json.dumps(meta, indent=1))
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
