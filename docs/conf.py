"""Sphinx configuration for the efficient_attention docs.

Why this stack: Sphinx + myst-parser + furo is the maintained standard in the
Python ecosystem (MkDocs 1.x is unmaintained and Material for MkDocs is in
maintenance mode); Sphinx's autodoc builds the API reference from the same
docstrings the code is read by, MyST lets the chapter pages be plain Markdown
with ``$...$`` math that also renders on GitHub, and the build runs offline.
Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(the test suite runs exactly this; warnings, including broken references,
fail it).
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "efficient_attention"
author = "the efficient_attention developers"
copyright = "2026, " + author

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",   # serves MathJax from the package: math renders without a network
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
suppress_warnings = ["myst.header"]

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "none"

html_theme = "furo"
html_title = "efficient_attention"
