"""The notebooks on the docs site: the Jupytext scripts of ``notebooks/`` (reached through the
symbolic link ``docs/notebooks``), read by myst-nb, executed at their default (small) sizes
at each build, rendered with their outputs and pictures, each with a link to its script."""
import re

import jupytext

#: the kernel every script runs in (the scripts' Jupytext headers name none)
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def read_script(text: str):
    """``nb_custom_formats`` reader: a percent-format script as a notebook."""
    nb = jupytext.reads(text, fmt="py:percent")
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    return nb


def _download_link(app, docname, source):
    """Put a cell with the download link to the script after the script's first cell (its title)."""
    if not docname.startswith("notebooks/"):
        return
    name = docname.split("/", 1)[1] + ".py"
    cell = (f"# %% [markdown]\n# {{download}}`Download the script {name} <{name}>` "
            f"(it runs as it is: `python notebooks/{name}`; `EA_FULL=1` for the full sizes). "
            "The outputs below are those of a run at its small default sizes, when these "
            "pages were built.\n\n")
    text = source[0]
    cells = [m.start() for m in re.finditer(r"^# %%", text, flags=re.M)]
    at = cells[1] if len(cells) > 1 else len(text)
    source[0] = text[:at] + cell + text[at:]


def setup(app):
    app.connect("source-read", _download_link)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
