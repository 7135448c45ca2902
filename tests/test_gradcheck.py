"""ea.gradcheck itself: passes a right backward, catches wrong ones, leaves inputs alone."""
import numpy as np
import pytest

import efficient_attention as ea


def _square(x):
    return x ** 2, x


def test_right_backward_passes_wrong_fails():
    x = np.random.default_rng(0).standard_normal((3, 4))
    assert ea.gradcheck(_square, (x,), lambda c, g: [2 * c * g]) < 1e-8
    assert ea.gradcheck(_square, (x,), lambda c, g: [2.01 * c * g]) > 1e-3
    assert ea.gradcheck(_square, (x,), lambda c, g: [c * g]) > 0.1


def test_catches_a_dense_backward_with_the_scale_dropped():
    class Buggy(ea.DenseAttention):
        def backward(self, cache, dout):
            g = super().backward(cache, dout)
            return ea.Grads(g.dq / cache.scale, g.dk, g.dv, {})   # planted bug in dq only

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((5, 4)) for _ in range(3))
    errs = ea.gradcheck(Buggy(), (q, k, v), full=True)
    assert errs["q"] > 0.1 and errs["k"] < 1e-6 and errs["v"] < 1e-6


def test_inputs_not_modified_and_float32_inputs_checked_in_float64():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3))
    saved = [a.copy() for a in (q, k, v)]
    assert ea.gradcheck(ea.DenseAttention(causal=True), (q, k, v)) < 1e-6
    for a, s in zip((q, k, v), saved):
        np.testing.assert_array_equal(a, s)


def test_parameters_checked_and_must_be_float64():
    class Scaled(ea.AttentionCore):
        """out = w * dense(q, k, v): a core with one learnable parameter."""

        def __init__(self, w):
            self.w = w

        @property
        def params(self):
            return {"w": self.w}

        def forward(self, q, k, v):
            out, cache = ea.DenseAttention().forward(q, k, v)
            return self.w * out, (cache, out)

        def backward(self, cache, dout):
            inner, out = cache
            g = ea.DenseAttention().backward(inner, self.w * dout)
            return ea.Grads(g.dq, g.dk, g.dv, {"w": np.array(np.sum(out * dout))})

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((3, 2)) for _ in range(3))
    w = np.array(1.5)
    errs = ea.gradcheck(Scaled(w), (q, k, v), full=True)
    assert set(errs) == {"q", "k", "v", "param.w"} and max(errs.values()) < 1e-6
    assert w == 1.5                                            # restored after perturbation
    with pytest.raises(ValueError, match="float64 parameters"):
        ea.gradcheck(Scaled(np.array(1.5, np.float32)), (q, k, v))
    with pytest.raises(ValueError, match="backward must be given"):
        ea.gradcheck(_square, (q,))
