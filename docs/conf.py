"""Sphinx configuration for the efficient_attention docs.

Why this stack: Sphinx + myst-parser + furo is the maintained standard in the
Python ecosystem (MkDocs 1.x is unmaintained and Material for MkDocs is in
maintenance mode); Sphinx's autodoc builds the API reference from the same
docstrings the code is read by, MyST lets the chapter pages be plain Markdown
with ``$...$`` math that also renders on GitHub, myst-nb executes the Jupytext notebooks
into pages with their outputs, and the build runs offline (MathJax from a package, the
intersphinx inventories from docs/_inventories).
Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(the test suite runs exactly this; warnings, including broken references,
fail it).
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))

# The notebooks run in Jupyter kernels started from this process: they import this checkout,
# show their pictures inline, run at their small default sizes and rewrite no picture of docs/img.
os.environ["PYTHONPATH"] = os.pathsep.join([os.path.abspath("..")] + [
    p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
for _name in ("EA_FULL", "EA_SAVE_IMG"):
    os.environ.pop(_name, None)

project = "efficient_attention"
author = "the efficient_attention developers"
copyright = "2026, " + author

extensions = [
    "myst_nb",                  # MyST Markdown pages and executed notebooks (includes myst_parser)
    "ea_notebooks",             # docs/_ext: the notebooks' reader and download links
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx-mathjax-offline",   # serves MathJax from the package: math renders without a network
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}   # myst-nb adds .py (nb_custom_formats)
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "_inventories", "_ext", "conf.py", "Thumbs.db", ".DS_Store"]
suppress_warnings = ["myst.header"]

# -- notebooks (myst-nb) ---------------------------------------------------------------
# notebooks/*.py are Jupytext percent scripts; docs/notebooks links to that directory.
# Every build executes them (small sizes: about a minute in all on two cores), so the pages
# show what the code does today; an error in a notebook fails the build.
nb_custom_formats = {".py": "ea_notebooks.read_script"}
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_preprocess_types = False   # types as written; Sphinx links the names it knows
autodoc_member_order = "bysource"
autodoc_default_options = {}          # every directive in docs/api/ says what it documents
autodoc_typehints = "signature"
autodoc_inherit_docstrings = True     # a core's forward/backward/cost read as the protocol's


# -- links to Python, NumPy and SciPy --------------------------------------------------
# No network at build time: the inventories are small hand-kept lists of the names these
# docs link to (docs/_inventories/README.md says where they come from), compiled into
# objects.inv files here; the links point at the online documentation.

def _compile_inventories():
    import tempfile
    import zlib
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_inventories")
    out = tempfile.mkdtemp(prefix="ea_inv_")
    paths = {}
    for name, project in [("python", "Python"), ("numpy", "NumPy"), ("scipy", "SciPy")]:
        with open(os.path.join(here, name + ".txt"), encoding="utf-8") as f:
            body = "".join(line for line in f if line.strip() and not line.startswith("#"))
        paths[name] = os.path.join(out, name + ".inv")
        with open(paths[name], "wb") as f:
            f.write(f"# Sphinx inventory version 2\n# Project: {project}\n# Version: \n"
                    "# The remainder of this file is compressed using zlib.\n".encode())
            f.write(zlib.compress(body.encode("utf-8")))
    return paths


_INV = _compile_inventories()
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", _INV["python"]),
    "numpy": ("https://numpy.org/doc/stable/", _INV["numpy"]),
    "scipy": ("https://docs.scipy.org/doc/scipy/", _INV["scipy"]),
}
#: names that annotations resolve to (a private module, an alias) -> the documented name
_EXTERNAL_ALIASES = {"np.ndarray": "numpy.ndarray", "ndarray": "numpy.ndarray",
                     "scipy.sparse._csr.csr_array": "scipy.sparse.csr_array",
                     "numpy.random._generator.Generator": "numpy.random.Generator",
                     "Path": "pathlib.Path", "np.dtype": "numpy.dtype", "dtype": "numpy.dtype"}
_TERMS = {"array_like", "callable", "sequence", "iterable", "mapping"}

# -- the API reference by public name ---------------------------------------------------
# The classes and functions are documented where the package exports them
# (``efficient_attention.DenseAttention``), shown as ``ea.DenseAttention``. Docstrings that
# name an object by the module it is defined in (``efficient_attention.blocksparse.BlockMask``,
# or ``BlockMask`` inside that module) are pointed at the public name.

def _public_target(env, target):
    """The documented public name for ``target``, or None."""
    import importlib
    objects = env.get_domain("py").objects
    if target in objects:
        return target
    name = target.rsplit(".", 1)[-1]
    if "efficient_attention." + name in objects:
        return "efficient_attention." + name
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):          # efficient_attention.blocksparse.BlockMask.from_dense
        head, tail = ".".join(parts[:i]), parts[i:]
        if head.startswith("efficient_attention."):
            try:
                obj = importlib.import_module(head)
            except ImportError:
                continue
            cand = "efficient_attention." + ".".join(tail)
            if cand in objects and getattr(obj, tail[0], None) is not None:
                return cand
    return None


def _missing_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if target in _EXTERNAL_ALIASES:
        from sphinx.ext.intersphinx import missing_reference
        node = node.deepcopy()
        node["reftarget"] = _EXTERNAL_ALIASES[target]
        return missing_reference(app, env, node, contnode)
    if target in _TERMS:                      # ``x : array_like`` in a parameter list
        from sphinx.ext.intersphinx import missing_reference
        node = node.deepcopy()
        node["refdomain"], node["reftype"] = "std", "term"
        return missing_reference(app, env, node, contnode)
    module = node.get("py:module") or ""
    if not (target.startswith("efficient_attention") or module.startswith("efficient_attention")):
        return None
    found = _public_target(env, target)
    if found is None and "." in target and not target.startswith("efficient_attention"):
        found = _public_target(env, "efficient_attention." + target)   # BlockMask.from_mask_mod
    if found is None and node.get("py:class"):
        found = _public_target(env, f"efficient_attention.{node['py:class']}.{target}")
    if found is None:
        return None
    from sphinx.util.nodes import make_refnode
    docname = env.get_domain("py").objects[found].docname
    return make_refnode(app.builder, node["refdoc"], docname, found, contnode, found)


def _skip_member(app, what, name, obj, skip, options):
    # NamedTuple fields: listed once, in the class signature and docstring
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def _public_bases(app, name, obj, options, bases):
    import efficient_attention as ea
    for i, base in enumerate(bases):
        b = base
        while b.__name__.startswith("_") and b.__mro__[1] is not object:
            b = b.__mro__[1]
        if getattr(ea, b.__name__, None) is b:
            bases[i] = f":py:class:`ea.{b.__name__} <efficient_attention.{b.__name__}>`"
        else:
            bases[i] = b


def _signature(app, what, name, obj, options, signature, return_annotation):
    # a backward's ``cache: _DenseCache``: the cache's type is private, say nothing of it
    import re
    if signature:
        signature = re.sub(r": ~?(?:[\w.]+\.)?_\w+", "", signature)
    return signature, return_annotation


def _short_prefix(app, doctree, docname):
    # ``efficient_attention.DenseAttention`` is shown as ``ea.DenseAttention``
    from sphinx import addnodes
    from docutils import nodes
    for node in doctree.findall(addnodes.desc_addname):
        text = node.astext()
        if text.startswith("efficient_attention."):
            node.children = [nodes.Text("ea." + text[len("efficient_attention."):])]


def setup(app):
    app.connect("missing-reference", _missing_reference)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("doctree-resolved", _short_prefix)
    app.connect("autodoc-process-signature", _signature)

html_theme = "furo"
html_title = "efficient_attention"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
