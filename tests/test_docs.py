"""The documentation site: it builds with warnings (broken references included) as errors,
the notebooks executed into it; the API pages document every public name and every core's
forward, backward and cost; the code of the Get-started and PyTorch pages runs."""
import inspect
import pathlib
import re
import subprocess
import sys
import types

import pytest

import efficient_attention as ea

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One build of the site for every test of this file: (completed process, html dir)."""
    out = tmp_path_factory.mktemp("docs") / "html"
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                          str(ROOT / "docs"), str(out)],
                         capture_output=True, text=True, timeout=900)
    return res, out


def test_docs_build_without_warnings(site):
    res, html = site
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert (html / "index.html").exists()
    assert (html / "_static" / "mathjax").is_dir()      # math renders offline


def _object_ids(page: pathlib.Path) -> set[str]:
    return set(re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', page.read_text(encoding="utf-8")))


def test_api_pages_list_forward_backward_cost_of_every_registered_core(site):
    _, html = site
    pages = {page: _object_ids(page) for page in sorted((html / "api").glob("*.html"))}
    assert pages, "no API pages were built"
    classes = {v.cls for v in ea.registry("core").values()}
    assert len(classes) >= 10
    for cls in sorted(classes, key=lambda c: c.__name__):
        assert getattr(ea, cls.__name__, None) is cls, f"{cls.__name__} is not a public name of the package"
        public = f"efficient_attention.{cls.__name__}"
        where = [page for page, ids in pages.items() if public in ids]
        assert len(where) == 1, f"{public} is documented on {len(where)} API pages"
        for method in ("forward", "backward", "cost"):
            assert f"{public}.{method}" in pages[where[0]], f"{where[0].name} lacks {public}.{method}"


def test_every_public_name_is_on_an_api_page_by_its_public_name(site):
    _, html = site
    text = "".join(p.read_text(encoding="utf-8") for p in (html / "api").glob("*.html"))
    for name in ea.__all__:
        obj = getattr(ea, name)
        anchor = f'id="module-efficient_attention.{name}"' if inspect.ismodule(obj) else f'id="efficient_attention.{name}"'
        assert anchor in text, f"ea.{name} is not on an API page as efficient_attention.{name}"


def test_api_pages_show_public_names_and_link_numpy_scipy_python(site):
    _, html = site
    text = (html / "api" / "00_full_attention.html").read_text(encoding="utf-8")
    assert "efficient_attention.dense.DenseAttention" not in re.sub(r"<[^>]+>", "", text)
    assert 'id="efficient_attention.DenseAttention"' in text
    assert re.search(r'<span class="sig-prename descclassname"><span class="pre">ea\.</span>', text)
    every = "".join(p.read_text(encoding="utf-8") for p in (html / "api").glob("*.html"))
    for url in ("https://numpy.org/doc/stable/reference/generated/numpy.ndarray.html#numpy.ndarray",
                "https://docs.scipy.org/doc/scipy/reference/generated/scipy.sparse.csr_array.html"
                "#scipy.sparse.csr_array",
                "https://docs.python.org/3/library/functions.html#bool"):
        assert url in every, f"no link to {url}"


def test_notebooks_are_rendered_with_their_outputs_pictures_and_a_download_link(site):
    _, html = site
    scripts = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    assert len(scripts) >= 10
    for script in scripts:
        page = html / "notebooks" / (script.stem + ".html")
        assert page.exists(), f"{script.name} is not rendered"
        text = page.read_text(encoding="utf-8")
        assert text.count('class="cell_output') >= 1, f"{page.name} shows no output"
        assert re.search(r'class="reference download internal"[^>]*href="[^"]*/' + re.escape(script.name), text), \
            f"{page.name} has no link to its script"
        assert "<img" in text, f"{page.name} shows no picture"
        assert "Traceback" not in text, f"{page.name} shows an error"


#: the full inventories the hand-kept ones were copied from (Debian's python3.11-doc, python-scipy-doc)
PACKAGED_INVENTORIES = {"python.txt": "/usr/share/doc/python3.11/html/objects.inv",
                        "scipy.txt": "/usr/share/doc/python-scipy-doc/html/objects.inv"}


def _hand_kept(name):
    """(name, domain:role) -> address of docs/_inventories/<name>, '$' expanded."""
    entries = {}
    for line in (ROOT / "docs" / "_inventories" / name).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.match(r"(.+?)\s+(\S+:\S+)\s+(-?\d+)\s+(\S+)\s+(.*)", line)
            assert m, f"{name}: not an inventory line: {line!r}"
            uri = m[4][:-1] + m[1] if m[4].endswith("$") else m[4]
            entries[m[1], m[2]] = uri
    return entries


@pytest.mark.parametrize("name", ["python.txt", "numpy.txt", "scipy.txt"])
def test_hand_kept_inventories_parse_and_agree_with_the_packaged_ones(name):
    entries = _hand_kept(name)
    assert len(entries) >= 5
    packaged = PACKAGED_INVENTORIES.get(name)
    if packaged is None or not pathlib.Path(packaged).exists():
        return                                   # numpy.txt has no packaged source; elsewhere: parsed only
    from sphinx.util.inventory import InventoryFile
    with open(packaged, "rb") as f:
        full = InventoryFile.load(f, "", lambda base, uri: uri)
    for (obj, role), uri in entries.items():
        assert obj in full.get(role, {}), f"{name}: {obj} ({role}) is not in {packaged}"
        assert full[role][obj].uri == uri, f"{name}: {obj} is at {full[role][obj].uri}, not {uri}"


# --------------------------------------------------------------------------- pages whose code runs

#: pages whose every ```python block runs, in order, in one namespace
RUNNABLE_PAGES = ["get_started.md", "from_pytorch.md"]
#: the first line of a block that needs PyTorch (not a dependency, not installed by the tests)
NEEDS_TORCH = "# needs PyTorch"


def _fences(page):
    """(language, code) of every fenced block of a docs page."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    return re.findall(r"^```(\S*)\n(.*?)^```\s*$", text, flags=re.S | re.M)


def _module(monkeypatch, name):
    """A fresh module for a page's blocks, importable by name (torch.compile looks its globals up)."""
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    return module.__dict__


def _torch_blocks():
    return [(page, i) for page in RUNNABLE_PAGES
            for i, (lang, code) in enumerate(_fences(page)) if lang == "python" and code.startswith(NEEDS_TORCH)]


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_the_python_blocks_of_the_page_run(page, capsys, monkeypatch):
    fences = _fences(page)
    assert {lang for lang, _ in fences} <= {"python", "bash"}, "a code block that is neither run nor a shell line"
    blocks = [code for lang, code in fences if lang == "python" and not code.startswith(NEEDS_TORCH)]
    assert len(blocks) >= 3
    namespace = _module(monkeypatch, "docs_page_blocks")
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page}, python block {i}", "exec"), namespace)
    assert capsys.readouterr().out.strip()                         # the blocks print what they show


def test_few_blocks_need_torch():
    assert 1 <= len(_torch_blocks()) <= 3


@pytest.mark.parametrize("page, index", _torch_blocks(), ids=lambda x: str(x))
def test_the_blocks_that_need_torch_run_where_it_is_installed(page, index, monkeypatch):
    pytest.importorskip("torch", reason=f"{page} python block {index} needs PyTorch, which is not installed")
    code = _fences(page)[index][1]
    exec(compile(code, f"{page}, python block {index}", "exec"), _module(monkeypatch, "docs_torch_block"))


def test_every_notebook_has_a_row_with_its_download_link():
    table = (ROOT / "docs" / "notebooks.md").read_text()
    for script in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        assert f"<notebooks/{script.stem}>`" in table, f"{script.name} is not in docs/notebooks.md"
        assert f"<../notebooks/{script.name}>`" in table, f"docs/notebooks.md has no download of {script.name}"


def test_every_chapter_page_is_in_the_toctree():
    index = (ROOT / "docs" / "index.md").read_text()
    for page in sorted((ROOT / "docs" / "chapters").glob("*.md")):
        assert f"chapters/{page.stem}" in index, f"{page.name} is not linked from docs/index.md"
