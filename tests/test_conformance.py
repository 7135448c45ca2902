"""The conformance runner: passes correct independent implementations, catches small planted bugs
with small counterexamples, and runs from the shell."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import efficient_attention as ea
from efficient_attention.testing import ConformanceReport, assert_attention_close, conformance

from naive import attention_in_dtype


# --- independent implementations (plain NumPy, another order of operations than the library's) ---

def _attention(q, k, v, mask=None, scale=None):
    return attention_in_dtype(q, k, v, None, mask, scale=scale)[0]


def attention(q, k, v, mask=None):
    return _attention(q, k, v, mask)


def attention_grads(q, k, v, dout, mask=None, *, scale=None, dq_factor=1.0):
    out, dq, dk, dv = attention_in_dtype(q, k, v, dout, mask, scale=scale)
    return out, dq * q.dtype.type(dq_factor), dk, dv


def _small(report: ConformanceReport, max_side=3):
    (failure,) = report.failures
    arrays = [a for a in failure.inputs.values() if isinstance(a, np.ndarray) and a.dtype != bool]
    return all(max(a.shape[-2:]) <= max_side and a.size <= 2 * max_side ** 2 for a in arrays)


# --- correct implementations pass -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reference", ["dense", "dense_causal", "local", "strided"])
def test_correct_independent_implementation_passes(reference, seed, dtype):
    report = conformance(attention, reference, dtype=dtype, seed=seed, max_examples=60)
    assert report.passed, str(report)
    assert report.examples >= 60 and report.failures == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("reference", ["dense", "local_causal"])
def test_correct_gradients_pass(reference, seed, dtype):
    report = conformance(attention_grads, reference, grads=True, dtype=dtype, seed=seed, max_examples=60)
    assert report.passed, str(report)


def test_layer_reference_takes_x():
    report = conformance(lambda x: np.fft.fft2(x).real.astype(x.dtype), "fnet", max_examples=30)
    assert report.passed, str(report)
    wrong = conformance(lambda x: np.fft.fft(x, axis=-2).real.astype(x.dtype), "fnet", max_examples=30)
    assert not wrong.passed and wrong.failures[0].output == "y"


@pytest.mark.parametrize("name", sorted(ea.registry()))
def test_every_registered_variant_is_a_usable_reference(name):
    """The reference itself, fed in float32 through the ``core`` argument, conforms to itself."""
    kind = ea.get_variant(name).kind
    if kind == "layer":
        report = conformance(lambda x: ea.get_variant(name).build(x.shape[-2], x.shape[-1])(x), name,
                             max_examples=5)
    else:
        def candidate(q, k, v, core):
            return core(q, k, v) if k is not None else core(q, v=v)
        report = conformance(candidate, name, max_examples=5)
    assert report.passed, str(report)


# --- planted bugs are caught, with small counterexamples --------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_off_by_a_tenth_of_a_percent_is_caught(dtype):
    def wrong(q, k, v, mask=None):
        return _attention(q, k, v, mask, scale=1.001 * q.shape[-1] ** -0.5)
    report = conformance(wrong, "dense", dtype=dtype)
    assert not report.passed and report.failures[0].output == "out"
    assert report.failures[0].error > report.failures[0].tolerance
    assert _small(report)


def test_one_dropped_key_is_caught():
    def wrong(q, k, v, mask=None):
        keep = np.ones(q.shape[:-1] + k.shape[-2:-1], bool) if mask is None else \
            np.broadcast_to(mask, q.shape[:-1] + k.shape[-2:-1]).copy()
        keep[..., -1] = k.shape[-2] == 1          # the last key is never seen (unless it is the only one)
        return attention(q, k, v, keep)
    report = conformance(wrong, "dense")
    assert not report.passed and _small(report)


def test_a_band_one_key_too_wide_is_caught():
    def wrong(q, k, v, core):
        i = np.arange(q.shape[-2])
        return attention(q, k, v, np.abs(i[:, None] - i[None, :]) <= core.window + 1)
    report = conformance(wrong, "local")
    assert not report.passed and _small(report, max_side=4)


def test_a_gradient_off_by_a_tenth_of_a_percent_is_caught():
    report = conformance(lambda q, k, v, dout, mask=None: attention_grads(q, k, v, dout, mask, dq_factor=1.001),
                         "dense", grads=True)
    assert not report.passed and report.failures[0].output == "dq" and _small(report)
    # the outputs alone are right: without grads it passes
    assert conformance(attention, "dense").passed


def test_exceptions_and_wrong_returns_are_failures():
    def broken(q, k, v):
        raise RuntimeError("boom")
    report = conformance(broken, "dense", max_examples=5)
    assert not report.passed and report.failures[0].output == "exception" and "boom" in str(report)
    report = conformance(lambda q, k, v, dout: attention(q, k, v), "dense", grads=True, max_examples=5)
    assert not report.passed and report.failures[0].output == "return"


def test_report_is_reproducible_and_readable():
    def wrong(q, k, v):
        return attention(q, k, v) + q.dtype.type(1e-3)
    first, second = (conformance(wrong, "dense", seed=3) for _ in range(2))
    assert str(first) == str(second)
    text = str(first)
    assert "FAILED" in text and "counterexample" in text and "tolerance" in text and "q float32" in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant must be one of"):
        conformance(attention, "no_such_variant")
    with pytest.raises(TypeError, match="dtype"):
        conformance(attention, "dense", dtype=np.float16)
    with pytest.raises(ValueError, match="max_examples"):
        conformance(attention, "dense", max_examples=0)
    with pytest.raises(TypeError, match="reference"):
        conformance(attention, 3)


# --- the lowp rule -----------------------------------------------------------------------------------

def _exact_and_lowp(q, k, v, dout):
    core = ea.DenseAttention()
    exact = core.backward(core.forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))[1],
                          dout.astype(np.float64))
    return exact, core.backward(core.forward(q, k, v)[1], dout)


def test_newcomer_case_passes_with_lowp():
    """The case a newcomer's run drew: every value row equal, so dk is zero in exact arithmetic
    (the terms cancel) and a correct float32 dk is rounding noise."""
    q = np.full((3, 1), 2.890625, np.float32)
    k = np.array([[2], [0], [0], [0], [0]], np.float32)
    v = np.ones((5, 1), np.float32)
    dout = np.ones((3, 1), np.float32)
    exact, lowp = _exact_and_lowp(q, k, v, dout)
    mag = ea.testing.rounding_scale(q, k, v, dout)
    assert np.all(np.abs(exact.dk) < 1e-12)
    for got, want, ref, m in zip(attention_grads(q, k, v, dout)[1:], exact[:3], lowp[:3], mag[1:]):
        assert_attention_close(got, want, np.float32, lowp=ref, magnitude=m, kind="grad")


def test_cancellation_beyond_a_fixed_atol_passes_and_a_real_error_still_fails():
    """A correct float32 dk 1e-5 away from an exact zero: the fixed atol fails it, and so does the
    oracle's own float32 result alone (the oracle happens to be exact here); the magnitude admits it."""
    q = np.array([[-21.10118], [21.595863]], np.float32)
    k = np.array([[2.442873], [1.7610016], [-2.0863717]], np.float32)
    v = np.full((3, 1), -1.6373483, np.float32)
    dout = np.array([[-1.6219081], [-2.5514216]], np.float32)
    exact, lowp = _exact_and_lowp(q, k, v, dout)
    mag = ea.testing.rounding_scale(q, k, v, dout)
    dk32 = attention_grads(q, k, v, dout)[2]                 # an independent, correct float32 dk
    assert np.max(np.abs(exact.dk)) < 1e-12 < 1e-6 < np.max(np.abs(dk32))
    with pytest.raises(AssertionError):
        assert_attention_close(dk32, exact.dk, np.float32, kind="grad")
    with pytest.raises(AssertionError):
        assert_attention_close(dk32, exact.dk, np.float32, lowp=lowp.dk, kind="grad")
    assert_attention_close(dk32, exact.dk, np.float32, lowp=lowp.dk, magnitude=mag[2], kind="grad")
    with pytest.raises(AssertionError):
        assert_attention_close(dk32 + np.float32(1e-3), exact.dk, np.float32, lowp=lowp.dk, magnitude=mag[2],
                               kind="grad")


@pytest.mark.parametrize("seed", [0, 1])
def test_rounding_scale_bounds_float32_errors_of_two_orders(seed):
    """Adversarial float32 inputs (large logits, equal value rows, equal keys): the library's float32
    oracle and an independent float32 implementation both stay within eps·rounding_scale (factor 1;
    the bound admits LOWP_FACTOR), while the fixed bound alone fails some of them."""
    rng = np.random.default_rng(seed)
    eps = np.finfo(np.float32).eps
    worst, fixed_failures = 0.0, 0
    for _ in range(400):
        n, m, d = rng.integers(1, 5), rng.integers(1, 6), rng.integers(1, 4)
        q = (rng.uniform(-3, 3, (n, d)) * rng.choice([1, 8])).astype(np.float32)
        k, v = rng.uniform(-3, 3, (m, d)).astype(np.float32), rng.uniform(-3, 3, (m, 2)).astype(np.float32)
        v[:] = v[:1] if rng.random() < 0.5 else v
        k[:] = k[:1] if rng.random() < 0.3 else k
        dout = rng.uniform(-3, 3, (n, 2)).astype(np.float32)
        exact, lowp = _exact_and_lowp(q, k, v, dout)
        mag = ea.testing.rounding_scale(q, k, v, dout)
        out64 = ea.DenseAttention()(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
        for got in (attention_grads(q, k, v, dout), (ea.DenseAttention()(q, k, v),) + tuple(lowp[:3])):
            for i, (g, want) in enumerate(zip(got, (out64,) + tuple(exact[:3]))):
                fixed = ea.testing.tolerance(want, np.float32, kind="value" if i == 0 else "grad")
                err = np.abs(g - want)
                fixed_failures += int(np.any(err > fixed))
                worst = max(worst, float(np.max(err / np.maximum(fixed, eps * mag[i]))))
    assert worst < 1.0, worst
    assert fixed_failures > 0          # the inputs are adversarial enough to trap a fixed atol


# --- the shell -----------------------------------------------------------------------------------------

def test_command_line_exit_status(tmp_path):
    (tmp_path / "candidates.py").write_text(textwrap.dedent("""
        import numpy as np
        def good(q, k, v):
            s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
            p = np.exp(s - s.max(-1, keepdims=True))
            return ((p / p.sum(-1, keepdims=True)) @ v).astype(q.dtype)
        def bad(q, k, v):
            return good(q, k, v) * q.dtype.type(1.01)
    """))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "efficient_attention.conformance", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    ok = run("candidates:good", "--reference", "dense", "--max-examples", "30")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASSED" in ok.stdout
    bad = run("candidates:bad", "--reference", "dense", "--dtype", "float64", "--max-examples", "30")
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "counterexample" in bad.stdout
    usage = run("candidates", "--reference", "dense")
    assert usage.returncode == 2 and "MODULE:CALLABLE" in usage.stderr
    unknown = run("candidates:good", "--reference", "nope")
    assert unknown.returncode == 2
