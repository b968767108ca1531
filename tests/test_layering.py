"""The package's dependencies point one way: no import cycle among its modules (imports inside functions
count too), and no module imports one from a higher layer. Also: the experiment template's parameters
cannot drift from the config's defaults."""
import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "diffusionret_nb"

# core → config → data and network parts → models → registry → training → evaluation → runs → experiments / CLI
LAYERS = {
    "core": 0, "config": 1,
    "clip": 2, "video": 2, "synthetic": 2, "datasets": 2, "benchmarks": 2, "prepare": 2,
    "encoders": 2, "losses": 2, "diffusion": 2, "denoiser": 2, "kernels": 2, "native": 2,
    "models": 3, "generator": 3, "clip4clip": 3, "xpool": 3, "dits": 3, "dits_model": 3,
    "registry": 4, "official": 4,
    "learner": 5, "training": 5, "distributed": 5,
    "metrics": 6, "inference": 6, "rerank": 6, "postprocess": 6, "feature_cache": 6, "bench": 6, "bench_train": 6,
    "pipeline": 7, "runner": 7, "results": 7, "plans": 7,
    "cli": 8, "train": 8,
}


def modules() -> list:
    return sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "_modidx"))


def imports_of(name: str) -> set:
    "Package modules imported anywhere in module `name` (top level and inside functions)."
    tree = ast.parse((PKG / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1: full = mod                              # from .x import y
            elif mod.startswith("diffusionret_nb."): full = mod.split(".", 1)[1]
            elif mod == "diffusionret_nb" or (node.level == 1 and not mod):
                out.update(a.name for a in node.names if (PKG / f"{a.name}.py").exists()); continue
            else: continue
            out.add(full.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("diffusionret_nb."): out.add(a.name.split(".")[1])
    return {m for m in out if (PKG / f"{m}.py").exists() and m != name}


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m not in LAYERS]
    assert not missing, f"modules without a layer in tests/test_layering.py: {missing}"


def test_no_import_points_up_a_layer():
    bad = [f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
           for m in modules() for d in sorted(imports_of(m)) if LAYERS[d] > LAYERS[m]]
    assert not bad, "imports that point up a layer:\n" + "\n".join(bad)


def find_cycle(graph: dict):
    "A cycle of the directed graph as a list of nodes, or None."
    state, stack = {}, []
    def visit(n):
        state[n] = 1; stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1: return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c: return c
        state[n] = 2; stack.pop()
    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c: return c


def test_no_import_cycle():
    graph = {m: imports_of(m) for m in modules()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_count(tmp_path, monkeypatch):
    (tmp_path / "x.py").write_text("def f():\n    from .y import z\n")
    (tmp_path / "y.py").write_text("import diffusionret_nb.x\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path)
    assert imports_of("x") == {"y"} and imports_of("y") == {"x"}


def template_parameters(path: Path) -> dict:
    "Names and default values assigned in the template's `parameters` cell."
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    out = {}
    for node in ast.parse("".join(cell["source"])).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            out[target.id] = ast.literal_eval(node.value)
    return out


RUN_TEMPLATES = sorted(p for p in (ROOT / "experiments").glob("*.ipynb") if p.name != "report.ipynb")  # report: a plan's parameters


def test_run_templates_are_the_train_and_evaluation_templates():
    assert [p.name for p in RUN_TEMPLATES] == ["evaluate.ipynb", "train_eval.ipynb"]


@pytest.mark.parametrize("template", RUN_TEMPLATES, ids=lambda p: p.name)
def test_template_defaults_are_the_config_defaults(template):
    from diffusionret_nb.config import PARAMS, RunConfig
    defaults = RunConfig().flat()
    params = template_parameters(template)
    drift = {k: (v, defaults[k]) for k, v in params.items() if k in PARAMS and v != defaults[k]}
    assert not drift, f"{template.name}: parameters cell defaults differ from the config's (template, config): {drift}"
    unknown = sorted(k for k in params if k not in PARAMS and k not in ("out_dir", "extra_json", "progress"))
    assert not unknown, f"{template.name}: parameters that are not config parameters: {unknown}"
