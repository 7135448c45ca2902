"""The documentation site builds, warnings (broken references included) are errors."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_docs_build_without_warnings(tmp_path):
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                          str(ROOT / "docs"), str(tmp_path / "html")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert (tmp_path / "html" / "index.html").exists()
    assert (tmp_path / "html" / "_static" / "mathjax").is_dir()      # math renders offline


def test_every_chapter_page_is_in_the_toctree():
    index = (ROOT / "docs" / "index.md").read_text()
    for page in sorted((ROOT / "docs" / "chapters").glob("*.md")):
        assert f"chapters/{page.stem}" in index, f"{page.name} is not linked from docs/index.md"
