"""The model of the small Long Range Arena (``bench_long_range.py``): a two-block pre-norm encoder.

::

    h  = tok[tokens] + pos                                    (B, N, D)   token + position embeddings
    for each of L blocks:
        a = h + attn(LN1(h))                                  (B, N, D)   the variant: MultiHeadAttention
                                                                          with its core on every head,
                                                                          or its own sequence layer
        h = a + MLP(LN2(a)),  MLP(x) = GELU(x W1 + b1) W2 + b2
    z  = mean over N of LN_f(h)                               (B, D)      mean pooling
    logits = z W + b                                          (B, C)

LayerNorm and the MLP live here, beside the benchmark, and not in the package: the package
is the attention family and its token mixers (``docs/developing.md``, the map of the house);
these two are the scaffolding a benchmark needs around them. Both have hand-written backward
passes next to their forward passes, gradient-checked in float64 by ``tests/test_long_range.py``
with ``efficient_attention.gradcheck``, and follow the library's layer protocol
(``forward(x) -> (y, cache)``, ``backward(cache, dy) -> LayerGrads``, ``params``).

Parameters are float64 arrays (Adam's master copy); the forward pass computes in the input's
dtype (float32 in the benchmark) and casts each parameter to it, as the library's layers do.
GELU is the tanh form (Hendrycks & Gimpel 2016, arXiv:1606.08415).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from efficient_attention import LayerGrads, SequenceLayer

__all__ = ["LayerNorm", "MLP", "Block", "Model", "Adam", "build_attention"]


# -- LayerNorm ---------------------------------------------------------------------------------

class _LNCache(NamedTuple):
    xhat: np.ndarray      # (..., D) normalised input
    rstd: np.ndarray      # (..., 1) 1 / sqrt(var + eps)
    g: np.ndarray         # (D,) gain in the computation dtype


def _ln_forward(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)                                   # (..., 1)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)    # (..., 1)
    xhat = xc * rstd                                                 # (..., D)
    return xhat * g + b, _LNCache(xhat, rstd, g)


def _ln_backward(cache, dy):
    xhat, rstd, g = cache
    dg = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0)              # dL/dg = Σ dy ⊙ x̂
    db = dy.reshape(-1, xhat.shape[-1]).sum(0)
    dxhat = dy * g
    # dx = (dx̂ - mean(dx̂) - x̂ · mean(dx̂ ⊙ x̂)) / σ
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, dg, db


class LayerNorm(SequenceLayer):
    """``y = (x - mean) / sqrt(var + eps) * g + b`` over the last axis (Ba et al. 2016, arXiv:1607.06450)."""

    def __init__(self, g, b, eps=1e-5):
        self.g, self.b, self.eps = g, b, eps

    @classmethod
    def init(cls, n=None, d=64, seed=0):
        return cls(np.ones(d), np.zeros(d))

    @property
    def params(self):
        return {"g": self.g, "b": self.b}

    def forward(self, x, *, check_finite=True):
        x = np.asarray(x)
        return _ln_forward(x, self.g.astype(x.dtype), self.b.astype(x.dtype), self.eps)

    def backward(self, cache, dy, *, check_finite=True):
        dx, dg, db = _ln_backward(cache, np.asarray(dy, dtype=cache.xhat.dtype))
        return LayerGrads(dx, {"g": dg.astype(self.g.dtype), "b": db.astype(self.b.dtype)})


# -- MLP ---------------------------------------------------------------------------------------

_C = float(np.sqrt(2 / np.pi))              # a Python float: keeps float32 arrays float32


class _MLPCache(NamedTuple):
    x: np.ndarray         # (..., D)
    h: np.ndarray         # (..., F) pre-activation
    t: np.ndarray         # (..., F) tanh(c (h + 0.044715 h³))
    w1: np.ndarray
    w2: np.ndarray


def _mlp_forward(x, w1, b1, w2, b2):
    h = x @ w1 + b1                                                  # (..., F)
    t = np.tanh(_C * (h + 0.044715 * (h * h * h)))                # (h³ as products: float32 pow is slow)
    a = 0.5 * h * (1 + t)                                            # GELU (tanh form)
    return a @ w2 + b2, _MLPCache(x, h, t, w1, w2)                   # (..., D)


def _mlp_backward(cache, dy):
    x, h, t, w1, w2 = cache
    a = 0.5 * h * (1 + t)
    f, d = w2.shape
    dw2 = a.reshape(-1, f).T @ dy.reshape(-1, d)                     # (F, D)
    db2 = dy.reshape(-1, d).sum(0)
    da = dy @ w2.T                                                   # (..., F)
    # GELU'(h) = ½(1 + t) + ½ h (1 - t²) c (1 + 3·0.044715 h²)
    dh = da * (0.5 * (1 + t) + 0.5 * h * (1 - t * t) * _C * (1 + 3 * 0.044715 * h * h))
    dw1 = x.reshape(-1, d).T @ dh.reshape(-1, f)                     # (D, F)
    db1 = dh.reshape(-1, f).sum(0)
    return dh @ w1.T, dw1, db1, dw2, db2


class MLP(SequenceLayer):
    """``y = GELU(x W1 + b1) W2 + b2``, applied to every token."""

    def __init__(self, w1, b1, w2, b2):
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2

    @classmethod
    def init(cls, n=None, d=64, seed=0, *, hidden=None):
        hidden = 2 * d if hidden is None else hidden
        rng = np.random.default_rng(seed)
        return cls(rng.standard_normal((d, hidden)) / np.sqrt(d), np.zeros(hidden),
                   rng.standard_normal((hidden, d)) / np.sqrt(hidden), np.zeros(d))

    @property
    def params(self):
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def forward(self, x, *, check_finite=True):
        x = np.asarray(x)
        return _mlp_forward(x, *(p.astype(x.dtype) for p in (self.w1, self.b1, self.w2, self.b2)))

    def backward(self, cache, dy, *, check_finite=True):
        dx, *grads = _mlp_backward(cache, np.asarray(dy, dtype=cache.x.dtype))
        return LayerGrads(dx, {k: g.astype(p.dtype) for (k, p), g in zip(self.params.items(), grads)})


# -- the pre-norm block --------------------------------------------------------------------------

def _prefixed(prefix, params):
    return {f"{prefix}.{k}": v for k, v in params.items()}


class Block(SequenceLayer):
    """``a = x + attn(LN1(x))``, ``y = a + MLP(LN2(a))`` (pre-norm, as in GPT-2 and LRA's encoders)."""

    def __init__(self, attn, ln1, mlp, ln2):
        self.attn, self.ln1, self.mlp, self.ln2 = attn, ln1, mlp, ln2

    @classmethod
    def init(cls, attn, d, seed=0, hidden=None):
        return cls(attn, LayerNorm.init(d=d), MLP.init(d=d, seed=seed, hidden=hidden), LayerNorm.init(d=d))

    @property
    def params(self):
        return {**_prefixed("ln1", self.ln1.params), **_prefixed("attn", self.attn.params),
                **_prefixed("ln2", self.ln2.params), **_prefixed("mlp", self.mlp.params)}

    def forward(self, x, *, check_finite=True):
        u, c1 = self.ln1.forward(x)
        s, ca = self.attn.forward(u, check_finite=check_finite)
        a = x + s.astype(x.dtype, copy=False)
        w, c2 = self.ln2.forward(a)
        m, cm = self.mlp.forward(w)
        return a + m, (c1, ca, c2, cm)

    def backward(self, cache, dy, *, check_finite=True):
        c1, ca, c2, cm = cache
        gm = self.mlp.backward(cm, dy)
        g2 = self.ln2.backward(c2, gm.dx)
        da = dy + g2.dx                                              # the residual and the MLP path
        ga = self.attn.backward(ca, da, check_finite=check_finite)
        g1 = self.ln1.backward(c1, ga.dx.astype(da.dtype, copy=False))
        params = {**_prefixed("ln1", g1.params), **_prefixed("attn", ga.params),
                  **_prefixed("ln2", g2.params), **_prefixed("mlp", gm.params)}
        return LayerGrads(da + g1.dx, params)


def build_attention(variant, n, d, heads, seed):
    """The variant's attention layer: its own layer, or ``MultiHeadAttention`` with its core on every head."""
    from efficient_attention import MultiHeadAttention
    if variant.kind == "layer":
        return variant.build(n=n, d=d, seed=seed)
    dk = d // heads
    cores = [variant.build(n=n, d=dk, dv=dk, seed=seed + h) for h in range(heads)]
    return MultiHeadAttention.init(n=n, d=d, seed=seed, heads=heads, cores=cores)


# -- the classifier ---------------------------------------------------------------------------

class Model:
    """Embeddings, ``len(attns)`` pre-norm blocks, a final LayerNorm, mean pooling, a linear classifier."""

    def __init__(self, attns, *, vocab, n, d, classes, seed=0, hidden=None, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.tok = rng.standard_normal((vocab, d))
        self.pos = 0.5 * rng.standard_normal((n, d))
        self.blocks = [Block.init(a, d, seed=seed + 7 * (i + 1), hidden=hidden) for i, a in enumerate(attns)]
        self.lnf = LayerNorm.init(d=d)
        self.w = rng.standard_normal((d, classes)) / np.sqrt(d)
        self.b = np.zeros(classes)

    @property
    def params(self):
        p = {"tok": self.tok, "pos": self.pos}
        for i, blk in enumerate(self.blocks):
            p.update(_prefixed(f"block{i}", blk.params))
        p.update(_prefixed("lnf", self.lnf.params))
        p.update({"w": self.w, "b": self.b})
        return p

    def forward(self, tokens):
        dt = self.dtype
        h = self.tok.astype(dt)[tokens] + self.pos.astype(dt)       # (B, N, D)
        caches = []
        for blk in self.blocks:
            h, c = blk.forward(h)
            caches.append(c)
        f, cf = self.lnf.forward(h)
        z = f.mean(1)                                                # mean pooling (B, D)
        logits = z @ self.w.astype(dt) + self.b.astype(dt)          # (B, C)
        return logits, (tokens, caches, cf, z)

    def loss_and_grads(self, tokens, labels):
        """Mean cross-entropy and the gradient of every parameter (float64 arrays keyed as ``params``)."""
        logits, (tokens, caches, cf, z) = self.forward(tokens)
        logits = logits.astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        bsz, n = tokens.shape
        loss = -np.mean(np.log(p[np.arange(bsz), labels] + 1e-30))
        dlogits = p
        dlogits[np.arange(bsz), labels] -= 1
        dlogits /= bsz                                               # d(mean CE)/dlogits
        grads = {"w": z.astype(np.float64).T @ dlogits, "b": dlogits.sum(0)}
        dz = (dlogits @ self.w.T).astype(self.dtype)                 # (B, D)
        df = np.broadcast_to(dz[:, None, :] / n, cf.xhat.shape)      # the mean's gradient (B, N, D)
        gf = self.lnf.backward(cf, df)
        grads.update(_prefixed("lnf", gf.params))
        dh = gf.dx
        for i in reversed(range(len(self.blocks))):
            g = self.blocks[i].backward(caches[i], dh)
            dh = g.dx
            grads.update(_prefixed(f"block{i}", g.params))
        dh2 = dh.reshape(-1, dh.shape[-1]).astype(np.float64)        # (B·N, D)
        onehot = (tokens.reshape(-1)[:, None] == np.arange(len(self.tok))).astype(np.float64)   # (B·N, V)
        grads["tok"] = onehot.T @ dh2                                # scatter into the embedding rows
        grads["pos"] = dh.astype(np.float64).sum(0)
        return loss, grads

    def predict(self, tokens, batch=64):
        return np.concatenate([np.argmax(self.forward(tokens[i:i + batch])[0], 1)
                               for i in range(0, len(tokens), batch)])


class Adam:
    """Adam (Kingma & Ba 2014, arXiv:1412.6980) on float64 parameter arrays, updated in place."""

    def __init__(self, params, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}
        self.v = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}

    def step(self, params, grads):
        self.t += 1
        for k, p in params.items():
            g = np.asarray(grads[k], dtype=np.float64)
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            mhat = self.m[k] / (1 - self.b1 ** self.t)
            vhat = self.v[k] / (1 - self.b2 ** self.t)
            p -= (self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(p.dtype)   # in place: live arrays
