"""The how-to gallery (docs/howto): every script runs, and every page shows one.

Each page includes its script with ``literalinclude``, so what a reader
copies is what runs here.  The scripts assert their own results.
"""

import re
import runpy
import tempfile
from pathlib import Path

import pytest

HOWTO = Path(__file__).resolve().parent.parent / "docs" / "howto"
SCRIPTS = sorted(p.name for p in HOWTO.glob("*.py") if not p.name.startswith("_"))
#: Scripts that need an optional extra, and the module that tells.
NEEDS = {"dask_cluster.py": "distributed"}

pytestmark = pytest.mark.skipif(not HOWTO.is_dir(), reason="docs/ not shipped here")


def test_every_script_has_a_page_in_the_index():
    index = (HOWTO / "index.rst").read_text()
    toctree = set(re.findall(r"^   (\w+)$", index, re.MULTILINE))
    assert len(SCRIPTS) >= 7
    for script in SCRIPTS:
        page = HOWTO / script.replace(".py", ".rst")
        assert page.is_file(), f"no page for {script}"
        assert f".. literalinclude:: {script}" in page.read_text(), f"{page.name} does not show {script}"
        assert page.stem in toctree, f"{page.name} is not in howto/index.rst"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs(script, tmp_path, monkeypatch, capsys):
    if script in NEEDS:
        pytest.importorskip(NEEDS[script])
    monkeypatch.syspath_prepend(str(HOWTO))  # for the _files helper
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the scripts' files go here
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(HOWTO / script), run_name="__main__")
