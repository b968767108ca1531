"""Fail (exit 1, listing the files) unless the notebooks are clean, the library is exported in sync
with them, every module has its source notebook, the experiment templates are papermill-ready, and
no notebook check or test makes a temporary folder that outlives it.

It works on a scratch copy: nothing in the working tree is modified.
Fix what it reports with `nbdev_clean && nbdev_export` (then commit) or by deleting the orphan."""
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def scratch_export(tmp: Path):
    "Copy settings, notebooks and library to `tmp`, then clean and export there."
    shutil.copy(ROOT / "settings.ini", tmp / "settings.ini")
    shutil.copytree(ROOT / "nbs", tmp / "nbs")
    shutil.copytree(ROOT / "diffusionret_nb", tmp / "diffusionret_nb",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in ("nbdev_clean", "nbdev_export"):
        r = subprocess.run([str(BIN / cmd)], cwd=tmp, capture_output=True, text=True)
        if r.returncode: sys.exit(f"{cmd} failed:\n{r.stdout}{r.stderr}")


def differing(tmp: Path) -> list:
    "Files whose cleaned/exported version differs from the working tree."
    bad = []
    for sub, pat in (("nbs", "*.ipynb"), ("diffusionret_nb", "*.py")):
        for p in sorted((tmp / sub).rglob(pat)):
            rel = p.relative_to(tmp)
            if not (ROOT / rel).exists() or not filecmp.cmp(p, ROOT / rel, shallow=False): bad.append(str(rel))
    return bad


def orphans() -> list:
    "Modules with no source notebook."
    bad = []
    for p in sorted((ROOT / "diffusionret_nb").glob("*.py")):
        if p.name in ("__init__.py", "_modidx.py"): continue
        src = [l.split("File to edit: ")[1].split()[0].rstrip(".") for l in p.read_text().splitlines()[:5] if "File to edit: " in l]
        if not src or not (p.parent / src[0]).resolve().exists(): bad.append(str(p.relative_to(ROOT)))
    return bad


def template_problems() -> list:
    "Experiment templates must have a python3 kernelspec, a `parameters` cell and no outputs."
    bad = []
    for p in sorted((ROOT / "experiments").glob("*.ipynb")):
        nb = json.loads(p.read_text())
        if nb.get("metadata", {}).get("kernelspec", {}).get("name") != "python3": bad.append(f"{p.name}: kernelspec is not python3")
        if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]): bad.append(f"{p.name}: no cell tagged 'parameters'")
        if any(c.get("outputs") or c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"): bad.append(f"{p.name}: has outputs")
        bad += [f"{p.name}: papermill cannot parse parameter {n!r} (avoid '=' in its comment)" for n in unparsed_parameters(p, nb)]
    return bad


def unparsed_parameters(path, nb) -> list:
    "Names assigned in the `parameters` cell that papermill's inspection does not see."
    import ast
    import papermill as pm
    cell = next((c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None: return []
    src = "".join(cell["source"])
    names = [t.target.id if isinstance(t, ast.AnnAssign) else t.targets[0].id
             for t in ast.parse(src).body if isinstance(t, (ast.Assign, ast.AnnAssign))]
    seen = set(pm.inspect_notebook(str(path)))
    return [n for n in names if n not in seen]


def leaky_scratch(root: Path = ROOT) -> list:
    "Notebook check cells and test files that make a temporary folder with `tempfile.mkdtemp`, which is never removed."
    bad = []
    for p in sorted((root / "nbs").glob("*.ipynb")):
        for c in json.loads(p.read_text())["cells"]:
            src = "".join(c["source"])
            if c["cell_type"] == "code" and "tempfile.mkdtemp(" in src and not src.lstrip().startswith("#| export"):
                bad.append(f"{p.relative_to(root)}: cell {c.get('id')}")
    bad += [str(p.relative_to(root)) for p in sorted((root / "tests").rglob("*.py")) if "tempfile.mkdtemp(" in p.read_text()]
    return bad


def main():
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        scratch_export(tmp)
        unsynced = differing(tmp)
    problems = [("notebooks not clean or library not exported in sync (run nbdev_clean && nbdev_export)", unsynced),
                ("modules without a source notebook (delete them or restore the notebook)", orphans()),
                ("experiment templates not ready for papermill", template_problems()),
                ("temporary folders never removed: use scratch_dir() from diffusionret_nb.core in notebooks, "
                 "pytest's tmp_path in tests", leaky_scratch())]
    failed = False
    for title, files in problems:
        if files:
            failed = True
            print(f"FAIL: {title}:"); print("\n".join(f"  {f}" for f in files))
    if failed: sys.exit(1)
    print("notebooks clean, library in sync, no orphan modules, templates ready")


if __name__ == "__main__":
    main()
