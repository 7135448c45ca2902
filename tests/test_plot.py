"""The plotting module: the algorithm modules import no plotting code, and every picture
draws into an Agg figure with the expected artists and arrays."""
import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from efficient_attention import patterns as P
from efficient_attention import figures, plot
from efficient_attention.lsh import LSHAttention
from efficient_attention.routing import RoutingAttention

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "efficient_attention"

# --------------------------------------------------------------------------- no plotting code in the algorithm

_IMPORT_ALL = """
import pkgutil, sys
import efficient_attention
names = [m.name for m in pkgutil.walk_packages(efficient_attention.__path__, "efficient_attention.")]
for name in names:
    __import__(name)
assert "efficient_attention.plot" in names and "efficient_attention.sinkhorn" in names, names
print(len(names), sorted(m for m in sys.modules if m.split(".")[0] == "matplotlib"))
"""


def test_importing_the_package_imports_no_matplotlib():
    """Every module of the package (efficient_attention.plot included: matplotlib is
    imported inside its functions) imports without loading matplotlib."""
    res = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    count, loaded = res.stdout.split(" ", 1)
    assert int(count) > 20 and loaded.strip() == "[]", res.stdout


def _imports(path):
    """Absolute names of the modules (and of the names taken from them) that ``path`` imports:
    (anywhere in the file, at its top level)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]       # e.g. ("efficient_attention",)
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    anywhere, toplevel = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] if node.level else ())
            module = ".".join(x for x in (base, node.module) if x)
            names = {module} | {f"{module}.{a.name}" for a in node.names}
        else:
            continue
        anywhere |= names
        if id(node) in top:
            toplevel |= names
    return anywhere, toplevel


def test_only_the_plot_module_draws():
    """No module but plot.py and figures.py imports matplotlib (inside their functions); plot.py
    imports no chapter (it draws what it is given, so that chapters may use it without a cycle:
    patterns.plot is plot_pattern), and figures.py, which builds the chapters' figures, is
    imported by no module of the package."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "plot.py" in files and PACKAGE / "config.py" in files and PACKAGE / "kernels" / "band.py" in files
    for path in files:
        anywhere, toplevel = _imports(path)
        if path.name not in ("plot.py", "figures.py"):
            assert not any(name.split(".")[0] == "matplotlib" for name in anywhere), path
        assert path.name == "figures.py" or not any(
            n == "efficient_attention.figures" or n.startswith("efficient_attention.figures.") for n in anywhere), path
    anywhere, toplevel = _imports(PACKAGE / "plot.py")
    assert "matplotlib.pyplot" in anywhere and "matplotlib.pyplot" not in toplevel
    package_imports = {n for n in anywhere if n.startswith("efficient_attention.")}
    assert all(n == "efficient_attention.validate" or n.startswith("efficient_attention.validate.")
               for n in package_imports), package_imports                 # the checks, no chapter
    assert "efficient_attention.plot.plot_pattern" in _imports(PACKAGE / "patterns.py")[1]


# --------------------------------------------------------------------------- matplotlib is optional

@pytest.mark.parametrize("draw", [
    lambda tmp: plot.plot_pattern(P.local(4, 1)),
    lambda tmp: P.plot(P.local(4, 1)),
    lambda tmp: plot.plot_sort_matrix(np.eye(3)),
    lambda tmp: figures.hand_designed_figures(tmp),
    lambda tmp: figures.clustered_figures(tmp),
], ids=["plot_pattern", "patterns.plot", "plot_sort_matrix", "hand_designed_figures", "clustered_figures"])
def test_missing_matplotlib_names_the_extra(draw, monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)            # import matplotlib... raises ImportError
    with pytest.raises(ImportError, match=r"matplotlib.*efficient_attention\[plot\]"):
        draw(tmp_path)
    assert not any(tmp_path.iterdir())                          # nothing drawn, no directory filled


# --------------------------------------------------------------------------- the pictures

@pytest.fixture
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    yield plt
    plt.close("all")


def test_plot_pattern_layers_legend_and_file(plt, tmp_path):
    a, b, c = P.local(12, 1), P.global_tokens(12, [0]), P.strided(12, 5)
    path = tmp_path / "pic.png"
    ax = plot.plot_pattern([a, b, c], path=path, labels=["local", "global", "strided"], title="t",
                           colors=["red", "green", "blue", "black"])
    img = np.asarray(ax.images[0].get_array())
    expected = np.where(c.toarray(), 3, np.where(b.toarray(), 2, np.where(a.toarray(), 1, 0)))
    np.testing.assert_array_equal(img, expected)                # later patterns on top
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["local", "global", "strided"]
    assert ax.get_title() == "t" and ax.get_xlabel() == "key j (12)" and ax.get_ylabel() == "query i (12)"
    cmap = ax.images[0].get_cmap()
    assert [tuple(np.round(cmap(i), 3)) for i in range(4)] == [(1, 1, 1, 1), (1, 0, 0, 1), (0, 0.502, 0, 1),
                                                               (0, 0, 1, 1)]
    assert path.stat().st_size > 0 and plt.imread(path).ndim == 3
    # into a given Axes, one pattern, default colours
    fig, given = plt.subplots()
    assert plot.plot_pattern(a, ax=given) is given and given.get_legend() is None
    assert given.images[0].get_cmap()(1) == pytest.approx(plt.matplotlib.colors.to_rgba(plot.COLORS[0]))
    # coarsened: the image is to_image's, one cell per block
    big = P.random(1000, 2, 0, m=300)
    ax2 = plot.plot_pattern(big, max_size=100)
    np.testing.assert_array_equal(np.asarray(ax2.images[0].get_array()), P.to_image(big, 100).astype(np.int64))


def test_plot_pattern_rejects_bad_input(plt):
    a = P.local(6, 1)
    with pytest.raises(ValueError, match="labels"):
        plot.plot_pattern([a, a], labels=["one"])
    with pytest.raises(ValueError, match="colors"):
        plot.plot_pattern([a, a], colors=["red"])
    with pytest.raises(ValueError, match="empty list"):
        plot.plot_pattern([])
    with pytest.raises(TypeError, match=r"pattern\[1\]"):
        plot.plot_pattern([a, np.eye(6, dtype=bool)])
    with pytest.raises(ValueError, match=r"pattern\[1\] must have shape"):
        plot.plot_pattern([a, P.local(7, 1)])


def test_patterns_plot_is_the_same_picture(plt):
    a, b = P.local(10, 2), P.random(10, 2, 3)
    ours = plot.plot_pattern([a, b], labels=["x", "y"], title="same", max_size=4)
    alias = P.plot([a, b], labels=["x", "y"], title="same", max_size=4)
    np.testing.assert_array_equal(np.asarray(alias.images[0].get_array()), np.asarray(ours.images[0].get_array()))
    assert alias.get_title() == "same" and [t.get_text() for t in alias.get_legend().get_texts()] == ["x", "y"]


def test_plot_sort_matrix_draws_p_and_rings_the_partners(plt):
    p = np.random.default_rng(0).random((5, 5))
    partner = np.array([1, 2, 3, 4, 0])
    ax = plot.plot_sort_matrix(p, partner=partner, title="P")
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), p)
    assert ax.images[0].get_clim() == (0, p.max())
    (rings,) = ax.collections
    np.testing.assert_array_equal(rings.get_offsets(), np.column_stack([partner, np.arange(5)]))
    assert ax.get_title() == "P" and ax.get_xlabel() == "key block c'" and ax.get_ylabel() == "query block c"
    fig, given = plt.subplots()
    assert plot.plot_sort_matrix(np.zeros((3, 3)), ax=given) is given and not given.collections
    with pytest.raises(ValueError, match="partner"):
        plot.plot_sort_matrix(p, partner=[0, 1])
    with pytest.raises(ValueError, match="p must be a 2-D"):
        plot.plot_sort_matrix(np.ones(4))


@pytest.fixture
def kept_figures(plt, monkeypatch):
    """The figures the chapter functions draw, kept open (they close them when done)."""
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    return figures


def test_hand_designed_figures(tmp_path, kept_figures):
    names = ["01_local_strided.png", "01_global_random.png", "01_longformer.png", "01_bigbird.png",
             "01_per_head.png"]
    paths = figures.hand_designed_figures(tmp_path / "img", n=24)
    assert [pathlib.Path(p).name for p in paths] == names
    assert all(pathlib.Path(p).stat().st_size > 0 for p in paths)
    assert [len(fig.axes) for fig in kept_figures] == [4, 2, 2, 1, 4]
    local = kept_figures[0].axes[0]
    np.testing.assert_array_equal(np.asarray(local.images[0].get_array()), P.local(24, 3).toarray())
    parts = P.bigbird_parts(32, 4, 1, 1, seed=1)
    bigbird = np.asarray(kept_figures[3].axes[0].images[0].get_array())
    expected = np.where(parts["global"].toarray(), 3, np.where(parts["window"].toarray(), 2,
                                                               np.where(parts["random"].toarray(), 1, 0)))
    np.testing.assert_array_equal(bigbird, expected)
    np.testing.assert_array_equal(bigbird > 0, P.bigbird(32, 4, 1, 1, seed=1).toarray())
    legend = kept_figures[3].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["random", "window", "global"]


def test_clustered_figures(tmp_path, kept_figures):
    paths = figures.clustered_figures(tmp_path, n=48, seed=0)
    assert [pathlib.Path(p).name for p in paths] == ["02_lsh_sorting.png", "02_lsh_rounds.png", "02_routing.png"]
    assert all(pathlib.Path(p).stat().st_size > 0 for p in paths)
    assert [len(fig.axes) for fig in kept_figures] == [4, 3, 3]
    q = figures._clustered_queries(48, 8, 4, 0)
    exact = LSHAttention(8, chunk_size=None, seed=0)
    buckets = exact.buckets(q)[0]
    order = np.argsort(buckets, kind="stable")
    unsorted, sorted_ = (np.asarray(ax.images[0].get_array()) for ax in kept_figures[0].axes[:2])
    np.testing.assert_array_equal(unsorted > 0, exact.pattern(q).toarray())
    np.testing.assert_array_equal(unsorted[unsorted > 0], (1 + buckets[:, None] * np.ones(48, int))[unsorted > 0])
    np.testing.assert_array_equal(sorted_, unsorted[np.ix_(order, order)])
    chunked = np.asarray(kept_figures[0].axes[3].images[0].get_array())
    np.testing.assert_array_equal(chunked > 0, LSHAttention(8, chunk_size=6, seed=0).pattern(q).toarray())
    for ax, rounds in zip(kept_figures[1].axes, (1, 2, 4)):
        pat = LSHAttention(8, n_hashes=rounds, chunk_size=6, seed=0).pattern(q)
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), pat.toarray().astype(int))
        assert ax.get_title().endswith(f"{pat.nnz / 48:.1f} keys/query")
    routing = RoutingAttention(np.random.default_rng(1).standard_normal((4, 8)))
    np.testing.assert_array_equal(np.asarray(kept_figures[2].axes[0].images[0].get_array()) > 0,
                                  routing.pattern(q, q).toarray())


def test_show_closes_outside_a_notebook_and_displays_inside_one(plt, monkeypatch, tmp_path):
    import types
    fig = plt.figure()
    plot.show(fig)                                       # a script: closed, nothing displayed
    assert not plt.fignum_exists(fig.number)
    path = tmp_path / "p.png"
    plot.show(path)                                      # a path outside a notebook: nothing to do

    shown = []
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object())    # a Jupyter kernel's shell
    display = types.ModuleType("IPython.display")
    display.display = shown.append
    display.Image = lambda data=None, filename=None: ("Image", filename or data[:8])
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    fig = plt.figure()
    plot.show(fig)
    plot.show(path)
    assert shown == [("Image", b"\x89PNG\r\n\x1a\n"), ("Image", str(path))]    # the figure as a PNG, the file
    assert not plt.fignum_exists(fig.number)
