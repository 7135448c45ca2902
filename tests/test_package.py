"""Packaging: one version, the licence and py.typed in the wheel, the metadata an index shows."""
import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import efficient_attention as ea

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_meets_build_requirement() -> bool:
    """Whether the installed setuptools satisfies pyproject.toml's build requirement (then the
    wheel can be built without fetching one: --no-build-isolation)."""
    try:
        import setuptools
    except ImportError:
        return False
    required = re.search(r'"setuptools>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    have = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    need = tuple(int(x) for x in required.group(1).split(".")[:2]) if required else (0,)
    return have >= need


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from a copy of what the build reads (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "efficient_attention", src / "efficient_attention",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    out = tmp_path_factory.mktemp("wheel")
    isolation = ["--no-build-isolation"] if _setuptools_meets_build_requirement() else []   # offline, seconds
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation,
                          "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (path,) = out.glob("efficient_attention-*.whl")
    return path


def _metadata(wheel_path) -> str:
    with zipfile.ZipFile(wheel_path) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return z.read(name).decode()


def test_version_written_once():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"].strip() == "attr: efficient_attention.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", ea.__version__)


def test_license_file_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the efficient_attention developers" in text
    assert "WITHOUT WARRANTY OF ANY KIND" in text


def test_wheel_carries_license_py_typed_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        licence = [n for n in names if re.search(r"\.dist-info/licenses/LICENSE$", n)]
        assert len(licence) == 1 and z.read(licence[0]) == (ROOT / "LICENSE").read_bytes()
    assert "efficient_attention/py.typed" in names
    meta = _metadata(wheel)
    fields = [line.split(": ", 1) for line in meta.split("\n\n")[0].splitlines() if ": " in line]
    values = {}
    for key, value in fields:
        values.setdefault(key, []).append(value)
    assert values["Version"] == [ea.__version__]
    assert values["License-Expression"] == ["MIT"] and values["License-File"] == ["LICENSE"]
    classifiers = set(values["Classifier"])
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Operating System :: OS Independent" in classifiers and "Typing :: Typed" in classifiers
    assert values["Requires-Python"] == [">=3.10"]
    assert "Project-URL" not in values and "Home-page" not in values   # no real URL exists yet


def test_main_version():
    res = subprocess.run([sys.executable, "-m", "efficient_attention", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"efficient_attention {ea.__version__}"
