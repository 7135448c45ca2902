"""Pattern builders against independent element-wise rules, pictures, bad input."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attention import patterns as P
from naive import bigbird_fixed_blocks, expand_blocks, random_candidates

sizes = st.integers(1, 40)


def _ij(n, m=None):
    m = n if m is None else m
    return np.arange(n)[:, None], np.arange(m)[None, :]


def _check_csr(p, n, m=None):
    m = n if m is None else m
    assert isinstance(p, sp.csr_array)
    assert p.dtype == np.bool_ and p.shape == (n, m)
    assert p.has_canonical_format            # sorted, no duplicates
    assert np.all(p.data)                   # no stored False
    return p.toarray()


# --------------------------------------------------------------------------- builders vs rules

@given(n=sizes, window=st.integers(0, 45), causal=st.booleans())
def test_local_rule(n, window, causal):
    i, j = _ij(n)
    rule = (np.abs(i - j) <= window) & ((i - j >= 0) if causal else True)
    np.testing.assert_array_equal(_check_csr(P.local(n, window, causal), n), rule)


@given(n=sizes, stride=st.integers(1, 45), window=st.none() | st.integers(0, 45), causal=st.booleans())
def test_strided_rule(n, stride, window, causal):
    i, j = _ij(n)
    rule = (i - j) % stride == 0
    if window is not None:
        rule &= np.abs(i - j) <= window * stride
    if causal:
        rule &= j <= i
    np.testing.assert_array_equal(_check_csr(P.strided(n, stride, window, causal), n), rule)


@given(data=st.data(), n=sizes)
def test_global_rule(data, n):
    idx = data.draw(st.lists(st.integers(0, n - 1), max_size=6))     # unsorted, repeats allowed
    i, j = _ij(n)
    g = np.zeros(n, bool)
    g[idx] = True
    rule = g[i] | g[j]
    np.testing.assert_array_equal(_check_csr(P.global_tokens(n, idx), n), rule)


@given(data=st.data(), n=sizes, m=st.none() | st.integers(0, 40), seed=st.integers(0, 2**31),
       causal=st.booleans(), with_exclude=st.booleans())
def test_random_rule(data, n, m, seed, causal, with_exclude):
    mm = n if m is None else m
    per_row = data.draw(st.integers(0, mm))
    exclude = None
    if with_exclude:
        exclude = data.draw(st.lists(st.lists(st.booleans(), min_size=mm, max_size=mm), min_size=n, max_size=n))
        exclude = np.array(exclude, bool).reshape(n, mm)
    ex = None if exclude is None else sp.csr_array(exclude)
    dense = _check_csr(P.random(n, per_row, seed, m, causal=causal, exclude=ex), n, mm)
    cand = random_candidates(n, mm, causal, exclude)                 # range(m), j <= i, not excluded
    assert not np.any(dense & ~cand)                                 # only candidate keys
    # exactly per_row distinct keys, fewer only when fewer candidates remain
    np.testing.assert_array_equal(dense.sum(axis=1), np.minimum(per_row, cand.sum(axis=1)))
    again = P.random(n, per_row, seed, m, causal=causal, exclude=ex).toarray()
    np.testing.assert_array_equal(again, dense)                      # seeded


def test_random_is_uniform_and_seed_dependent():
    # both drawing branches: per_row**2 <= m (rejection) and > m (permutation)
    for per_row, m in ((3, 50), (20, 50)):
        counts = P.random(4000, per_row, 1, m=m).toarray().sum(axis=0)
        expected = 4000 * per_row / m
        assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))    # ~6 sigma
        a, b = P.random(64, per_row, 1, m=m), P.random(64, per_row, 2, m=m)
        assert (a != b).nnz > 0


def test_random_with_exclusion_or_causal_is_uniform_over_the_candidates():
    """The keys left after ``exclude`` (rows of different lengths, so the padded permutation
    branch mixes row lengths) and after the causal cut are drawn uniformly, in both branches."""
    n, m = 7000, 50
    rows = np.arange(n)
    low = rows % 7                                     # row i excludes keys < i % 7 and keys 20..29
    i, j = rows[:, None], np.arange(m)[None, :]
    exclude = (j < low[:, None]) | ((j >= 20) & (j < 30))
    for per_row in (3, 8):                             # 3² <= 34..40 candidates: redraws; 8² > 40: permutations
        p = P.random(n, per_row, 4, m=m, exclude=sp.csr_array(exclude)).toarray()
        for r in range(7):                             # rows with the same candidates: uniform counts
            counts = p[low == r].sum(axis=0)
            cand = ~exclude[r]
            expected = (low == r).sum() * per_row / cand.sum()
            assert np.all(counts[~cand] == 0)
            assert np.all(np.abs(counts[cand] - expected) < 6 * np.sqrt(expected)), (per_row, r)
    # causal, ragged lengths: row i keeps min(r, i + 1) of its i + 1 candidates; over seeds each is as likely
    hits = np.zeros((12, 12))
    for seed in range(600):
        hits += P.random(12, 3, seed, causal=True).toarray()
    expected = 600 * np.minimum(3, np.arange(12) + 1) / (np.arange(12) + 1)
    allowed = j[:, :12] <= i[:12]
    assert np.all(hits[~allowed] == 0)
    expected = np.broadcast_to(expected[:, None], hits.shape)
    tol = 6 * np.sqrt(expected * (1 - expected / 600)) + 1e-9        # 6 sigma of a binomial count
    assert np.all(np.abs(hits - expected)[allowed] <= tol[allowed])


@given(data=st.data(), n=sizes)
def test_union_rule(data, n):
    seeds = data.draw(st.lists(st.integers(0, 2**31), min_size=1, max_size=4))
    pats = [P.random(n, data.draw(st.integers(0, n)), s) for s in seeds]
    expected = np.logical_or.reduce([p.toarray() for p in pats])
    np.testing.assert_array_equal(_check_csr(P.union(*pats), n), expected)


@given(data=st.data(), n=sizes, window=st.integers(0, 12), dilation=st.integers(1, 5), causal=st.booleans())
def test_longformer_rule(data, n, window, dilation, causal):
    idx = data.draw(st.lists(st.integers(0, n - 1), max_size=3))
    i, j = _ij(n)
    g = np.zeros(n, bool)
    g[idx] = True
    rule = (((i - j) % dilation == 0) & (np.abs(i - j) <= window * dilation)) | g[i] | g[j]
    if causal:
        rule &= j <= i
    np.testing.assert_array_equal(_check_csr(P.longformer(n, window, idx, dilation, causal), n), rule)


@settings(max_examples=100)
@given(data=st.data(), block=st.integers(1, 4), nb=st.integers(1, 14), wb=st.integers(0, 7),
       seed=st.integers(0, 2**31), causal=st.booleans())
def test_bigbird_rule(data, block, nb, wb, seed, causal):
    n_rand = data.draw(st.integers(0, nb))
    n_glob = data.draw(st.integers(0, nb))
    n = nb * block
    dense = _check_csr(P.bigbird(n, block, n_rand, n_glob, wb, seed, causal), n)
    bk = dense.reshape(nb, block, nb, block).any(axis=(1, 3))               # (nb, nb) blocks touched
    # the token pattern is the block pattern expanded (causal: and j <= i)
    np.testing.assert_array_equal(dense, expand_blocks(bk, block, causal))
    fixed = bigbird_fixed_blocks(nb, n_glob, wb)                             # window and global blocks
    allowed = np.tril(np.ones((nb, nb), bool)) if causal else np.ones((nb, nb), bool)
    assert np.all(bk[fixed & allowed])                                       # all present
    assert not np.any(bk & ~allowed)                                         # causal: no block J > I
    extra = bk & ~fixed                                                      # the random blocks
    remaining = (~fixed & allowed).sum(axis=1)
    # exactly n_rand extra blocks per row block, fewer only when fewer remain
    np.testing.assert_array_equal(extra.sum(axis=1), np.minimum(n_rand, remaining))
    np.testing.assert_array_equal(P.bigbird(n, block, n_rand, n_glob, wb, seed, causal).toarray(), dense)


def test_bigbird_random_blocks_follow_the_seed_and_cover_the_candidates():
    nb, block = 24, 2
    fixed = bigbird_fixed_blocks(nb, 2, 3)
    extras = []
    for seed in range(40):
        bk = P.bigbird(nb * block, block, 3, 2, 3, seed).toarray()[::block, ::block]
        extras.append(bk & ~fixed)
        assert np.all(extras[-1].sum(axis=1)[2:] == 3)                       # 3 extra for every non-global row
    assert any((a != extras[0]).any() for a in extras[1:])                   # other seeds, other blocks
    assert np.all(np.sum(extras, axis=0)[~fixed] > 0)                        # every candidate block drawn
    # the parts drawn in the chapter's picture are the same blocks
    parts = P.bigbird_parts(nb * block, block, 3, 2, 3, seed=7)
    np.testing.assert_array_equal(P.union(*parts.values()).toarray(),
                                  P.bigbird(nb * block, block, 3, 2, 3, 7).toarray())
    parts = P.bigbird_parts(nb * block, block, 3, 2, 3, seed=7, causal=True)
    np.testing.assert_array_equal(P.union(*parts.values()).toarray(),
                                  P.bigbird(nb * block, block, 3, 2, 3, 7, causal=True).toarray())


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_parts_are_the_three_kinds_of_blocks(causal):
    nb, block, n_rand, n_glob, wb = 10, 3, 2, 2, 3
    n = nb * block
    parts = P.bigbird_parts(n, block, n_rand, n_glob, wb, seed=4, causal=causal)
    assert set(parts) == {"window", "global", "random"}
    dense = {name: _check_csr(part, n) for name, part in parts.items()}
    fixed = bigbird_fixed_blocks(nb, n_glob, wb)
    window = bigbird_fixed_blocks(nb, 0, wb)
    np.testing.assert_array_equal(dense["window"], expand_blocks(window, block, causal))
    np.testing.assert_array_equal(dense["window"] | dense["global"], expand_blocks(fixed, block, causal))
    assert not (dense["random"] & expand_blocks(fixed, block)).any()    # extra blocks only
    allowed = np.tri(nb, dtype=bool) if causal else np.ones((nb, nb), bool)
    extra = dense["random"][::block, ::block]                               # random blocks, by block
    np.testing.assert_array_equal(dense["random"], expand_blocks(extra, block, causal))
    np.testing.assert_array_equal(extra.sum(axis=1), np.minimum(n_rand, (~fixed & allowed).sum(axis=1)))
    np.testing.assert_array_equal(P.union(*parts.values()).toarray(),
                                  P.bigbird(n, block, n_rand, n_glob, wb, seed=4, causal=causal).toarray())


def test_degenerate_patterns_are_full():
    n = 13
    full = np.ones((n, n), bool)
    np.testing.assert_array_equal(P.local(n, n).toarray(), full)
    np.testing.assert_array_equal(P.local(n, n - 1).toarray(), full)
    np.testing.assert_array_equal(P.strided(n, 1).toarray(), full)
    np.testing.assert_array_equal(P.global_tokens(n, range(n)).toarray(), full)
    np.testing.assert_array_equal(P.random(n, n, 3).toarray(), full)
    np.testing.assert_array_equal(P.bigbird(12, 3, 0, 0, window_blocks=7).toarray(), np.ones((12, 12), bool))
    np.testing.assert_array_equal(P.local(n, 0).toarray(), np.eye(n, dtype=bool))
    assert P.global_tokens(n, []).nnz == 0 and P.random(n, 0, 0).nnz == 0


def test_large_local_is_vectorised():
    # 2**20 rows in chunks (a Python loop over rows would take minutes)
    n = 2**20
    p = P.local(n, 3, causal=True)
    assert p.nnz == 4 * n - 6 and p.indices.dtype == np.int32
    np.testing.assert_array_equal(p.indices[p.indptr[n - 1]:], [n - 4, n - 3, n - 2, n - 1])
    np.testing.assert_array_equal(p.indices[:6], [0, 0, 1, 0, 1, 2])


def test_examples_and_draw_pattern_reproduce():
    for n in (1, 5, 16):
        ex = P.examples(n)
        assert {"local", "strided", "global", "random", "longformer", "bigbird", "empty_rows"} <= set(ex)
        for p in ex.values():
            _check_csr(p, n)
        assert (ex["empty_rows"].toarray().sum(axis=1) == 0).any() or n == 1
    rng = np.random.default_rng(5)
    for _ in range(30):
        n = int(rng.integers(1, 20))
        desc, p = P.draw_pattern(rng, n)
        again = eval(desc, {**vars(P), "random": P.random})               # the description rebuilds it
        np.testing.assert_array_equal(again.toarray(), _check_csr(p, n))


# --------------------------------------------------------------------------- pictures

def test_to_image_is_the_pattern_or_its_blocks():
    p = P.random(30, 3, 1, m=17)
    np.testing.assert_array_equal(P.to_image(p), p.toarray())
    np.testing.assert_array_equal(P.to_image(p, max_size=30), p.toarray())
    img = P.to_image(p, max_size=8)                          # blocks of 4 rows x 3 columns
    assert img.shape == (8, 6) and img.dtype == np.bool_
    dense = p.toarray()
    for r in range(8):
        for c in range(6):
            assert img[r, c] == dense[4 * r:4 * r + 4, 3 * c:3 * c + 3].any()
    with pytest.raises(ValueError, match="max_size"):
        P.to_image(p, max_size=0)
    with pytest.raises(TypeError, match="pattern"):
        P.to_image(dense)


def test_to_ascii_matches_pattern():
    p = P.longformer(9, 1, [4])
    lines = P.to_ascii(p).splitlines()
    assert len(lines) == 9 and all(len(line) == 9 for line in lines)
    np.testing.assert_array_equal(np.array([[c == "#" for c in line] for line in lines]), p.toarray())
    # coarsened: a character per 2x2 block, '#' when any entry is allowed
    big = P.local(200, 0)
    small = P.to_ascii(big, on="X", off="-", max_size=100).splitlines()
    assert len(small) == 100 and small[0] == "X" + "-" * 99 and small[-1] == "-" * 99 + "X"


def test_plot_draws_one_colour_per_pattern(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a, b = P.local(10, 1), P.global_tokens(10, [0])
    path = tmp_path / "pic.png"
    ax = P.plot([a, b], path=path, labels=["local", "global"], title="t")
    img = np.asarray(ax.images[0].get_array())
    expected = np.where(b.toarray(), 2, np.where(a.toarray(), 1, 0))   # later pattern on top
    np.testing.assert_array_equal(img, expected)
    assert path.stat().st_size > 0
    ax2 = P.plot(P.local(1000, 5))                                       # coarsened to <= 256 per side
    assert max(np.asarray(ax2.images[0].get_array()).shape) <= 256
    plt.close("all")
    with pytest.raises(ValueError, match="labels"):
        P.plot([a, b], labels=["one"])
    with pytest.raises(TypeError, match="pattern"):
        P.plot(np.ones((3, 3), bool))


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, exc, word", [
    (lambda: P.local(8, -1), ValueError, "window"),
    (lambda: P.local(-1, 1), ValueError, "n"),
    (lambda: P.local(8, 1.5), TypeError, "window"),
    (lambda: P.local(8, 1, causal=1), TypeError, "causal"),
    (lambda: P.strided(8, 0), ValueError, "stride"),
    (lambda: P.strided(8, 2, window=-2), ValueError, "window"),
    (lambda: P.global_tokens(8, [8]), ValueError, "indices"),
    (lambda: P.global_tokens(8, [-1]), ValueError, "indices"),
    (lambda: P.global_tokens(8, [0.5]), TypeError, "indices"),
    (lambda: P.random(8, 9, 0), ValueError, "per_row"),
    (lambda: P.random(8, 3, 0, m=2), ValueError, "per_row"),
    (lambda: P.random(8, -1, 0), ValueError, "per_row"),
    (lambda: P.random(8, 1, -5), ValueError, "seed"),
    (lambda: P.random(8, 1, 0, causal="yes"), TypeError, "causal"),
    (lambda: P.random(8, 1, 0, exclude=P.local(7, 1)), ValueError, "exclude"),
    (lambda: P.random(8, 1, 0, m=4, exclude=P.local(8, 1)), ValueError, "exclude"),
    (lambda: P.random(8, 1, 0, exclude=np.eye(8, dtype=bool)), TypeError, "exclude"),
    (lambda: P.union(), ValueError, "union"),
    (lambda: P.union(P.local(4, 1), P.local(5, 1)), ValueError, "patterns\\[1\\]"),
    (lambda: P.union(np.eye(3, dtype=bool)), TypeError, "patterns"),
    (lambda: P.longformer(8, -1, [0]), ValueError, "window"),
    (lambda: P.longformer(8, 1, [9]), ValueError, "indices"),
    (lambda: P.longformer(8, 1, [0], dilation=0), ValueError, "dilation"),
    (lambda: P.longformer(8, 1, [0], causal=1), TypeError, "causal"),
    (lambda: P.bigbird(10, 4, 1, 1), ValueError, "block_size"),
    (lambda: P.bigbird(8, 0, 1, 1), ValueError, "block_size"),
    (lambda: P.bigbird(8, 4, 3, 1), ValueError, "n_random_blocks"),
    (lambda: P.bigbird(8, 4, 1, 3), ValueError, "n_global_blocks"),
    (lambda: P.bigbird(8, 4, 1, 1, window_blocks=-1), ValueError, "window_blocks"),
    (lambda: P.bigbird(8, 4, 1, 1, causal=None), TypeError, "causal"),
    (lambda: P.bigbird_parts(10, 4, 1, 1), ValueError, "block_size"),
    (lambda: P.bigbird_parts(8, 4, 3, 1), ValueError, "n_random_blocks"),
    (lambda: P.to_ascii(np.eye(3)), TypeError, "pattern"),
])
def test_bad_arguments(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_bad_csr_is_rejected_before_use():
    p = P.local(6, 1)
    p.indices[3] = 99                                   # out of range, scipy does not check
    with pytest.raises(ValueError, match="indices"):
        P.to_ascii(p)
    with pytest.raises(ValueError, match="indices"):
        P.union(P.local(6, 1), p)
