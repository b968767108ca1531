"""tools/check_notebooks.py's check for temporary folders that outlive their notebook or test (`make test` runs it on
this repository; here it runs on a made-up one, to show it finds what it should)."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_notebooks", ROOT / "tools" / "check_notebooks.py")
check_notebooks = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(check_notebooks)


MKDTEMP = "tempfile." "mkdtemp("     # split, so that this file does not hold what it looks for


def _nb(path: Path, *cells: str):
    path.write_text(json.dumps(dict(cells=[dict(cell_type="code", id=f"c{i}", source=s.splitlines(keepends=True))
                                           for i, s in enumerate(cells)])))


def test_mkdtemp_in_a_check_cell_or_a_test_is_reported(tmp_path):
    (tmp_path / "nbs").mkdir(); (tmp_path / "tests").mkdir()
    _nb(tmp_path / "nbs" / "01_a.ipynb", f"#| export\ndef f(): return {MKDTEMP})   # the library's own, removed by f's caller",
        "_d = scratch_dir()")
    assert check_notebooks.leaky_scratch(tmp_path) == []
    _nb(tmp_path / "nbs" / "02_b.ipynb", "x = 1", f"import tempfile\n_d = Path({MKDTEMP}))")
    (tmp_path / "tests" / "test_x.py").write_text(f"import tempfile\nD = {MKDTEMP})\n")
    (tmp_path / "tests" / "test_y.py").write_text("def test_y(tmp_path): pass\n")
    assert check_notebooks.leaky_scratch(tmp_path) == ["nbs/02_b.ipynb: cell c1", "tests/test_x.py"]
