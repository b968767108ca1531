"""The papers' published numbers (diffusionret_nb/papers/*.csv): the schema, Rsum = R@1+R@5+R@10, and, where
../shared/papers is beside the repository, every row against the transcribed papers. Each printed row is rebuilt
from the CSV (a missing number printed as "-", a failed evaluation as "×") and compared, cell by cell, with the
line of the text holding it; the column and metric of each cell are read from the text's own table headers, so a
typo, a swapped cell, a missing or an extra number all fail."""
import csv
import re
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "diffusionret_nb" / "papers"
PAPERS = Path(__file__).resolve().parents[1].parent / "shared" / "papers"
DIFFRET_TXT = "diffusionret-iccv2023-fulltext.txt"
DITS_MD = "dits-neurips2024-tables.md"

COLUMNS = ["paper", "table", "row", "column", "metric", "value", "note"]
TABLES = {"diffusionret": ["1", "2", "A", "3a", "3b", "3c", "3d", "3e", "3f", "4", "5", "B"],
          "dits": ["1", "2", "3", "4", "5a", "5b", "6a", "6b", "7", "9", "10", "11"]}
CROSS = "×"
# Rows whose printed Rsum is not R@1+R@5+R@10 in the paper itself (key: paper, table, row, column). None found.
RSUM_WHITELIST: set = set()


def read(paper: str) -> list[dict]:
    with open(DATA / f"{paper}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def key(r: dict) -> tuple: return r["paper"], r["table"], r["row"], r["column"], r["metric"]


def paper_text(name: str) -> str:
    p = PAPERS / name
    if not p.exists(): pytest.skip(f"../shared/papers not found: {p} (the transcribed papers beside the repository)")
    return p.read_text(encoding="utf-8")


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize("paper", ["diffusionret", "dits"])
def test_schema(paper):
    with open(DATA / f"{paper}.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == COLUMNS
    recs = read(paper)
    assert {r["paper"] for r in recs} == {paper}
    keys = [key(r) for r in recs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    assert not dup, f"repeated (paper, table, row, column, metric): {dup}"
    bad = []
    for r in recs:
        if r["value"] == "":
            if not r["note"].startswith(CROSS): bad.append(r)
        else:
            try: float(r["value"])
            except ValueError: bad.append(r)
        if any(s != s.strip() or s == "" for s in (r["table"], r["row"], r["column"], r["metric"])): bad.append(r)
    assert not bad, f"bad values or labels: {bad}"
    seen = [r["table"] for r in recs]
    assert list(dict.fromkeys(seen)) == TABLES[paper], "every table, in paper order"


def test_diffusionret_vocabulary():
    recs = read("diffusionret")
    m6 = {"R@1", "R@5", "R@10", "Rsum", "MdR", "MnR"}
    want = {"1": ({"Text-to-Video", "Video-to-Text"}, m6),
            "2": ({"LSMDC", "MSVD", "ActivityNet Captions", "DiDeMo"}, m6),
            "A": ({"LSMDC", "MSVD", "ActivityNet Captions", "DiDeMo"}, m6),
            **{t: ({"Text-to-Video"}, {"R@1", "R@5", "R@10", "MnR"}) for t in ("3a", "3b", "3c", "3d", "3f")},
            "3e": ({"10", "50", "100", "1000"}, {"R@1"}),
            "4": ({"1,000", "3,000", "5,000"}, {"Inference Time (s)", "GPU Memory (M)", "R@1"}),
            "5": ({"MSRVTT", "MSRVTT->DiDeMo", "MSRVTT->LSMDC"}, {"R@1", "R@5", "R@10", "MdR"}),
            "B": ({"MSRVTT", "MSRVTT->ActivityNet Captions"}, {"R@1", "R@5", "R@10", "Rsum", "MdR"})}
    for t, (cols, mets) in want.items():
        rs = [r for r in recs if r["table"] == t]
        assert {r["column"] for r in rs} == cols, t
        assert {r["metric"] for r in rs} == mets, t
    def rows(t): return list(dict.fromkeys(r["row"] for r in recs if r["table"] == t))
    assert rows("3a") == ["MSE", "KL"] and rows("3b") == ["DDPM", "DDIM"] and rows("3c") == ["Linear", "Cosine"]
    assert rows("3d") == ["CLIP zero-shot", "Generation (Gen)", "Discrimination (Dis)", "Both Gen and Dis"]
    assert rows("3e") == ["10", "50", "100", "1000"] and rows("3f") == ["0.1", "0.5", "1.0", "1.5", "2.0"]
    assert rows("4") == ["CLIP4Clip", "X-Pool", "TS2-Net"] + [f"DiffusionRet (Ours), {s} steps" for s in (1, 3, 5, 10, 30, 50)]
    assert "DiffusionRet (Ours)" in rows("1") and "+ QB-Norm" in rows("1")
    assert not [r for r in recs if re.search(r"\[|\]|<small>|_\{", r["row"])], "citation marks and venues are stripped"


def test_reads_cleanly_with_pandas():
    pd = pytest.importorskip("pandas")
    for paper in TABLES:
        df = pd.read_csv(DATA / f"{paper}.csv", dtype=str, keep_default_na=False)
        assert list(df.columns) == COLUMNS
        assert df.to_dict("records") == read(paper)
        vals = pd.to_numeric(df["value"].replace("", float("nan")))
        assert vals.notna().sum() == (df["value"] != "").sum()


def rsum_errors(recs: list[dict]) -> list[str]:
    "Rows where all of R@1, R@5, R@10 and Rsum are printed and Rsum is not their sum (within 0.15)."
    by = defaultdict(dict)
    for r in recs:
        if r["value"] != "": by[r["paper"], r["table"], r["row"], r["column"]][r["metric"]] = float(r["value"])
    errs = []
    for k, m in by.items():
        if {"R@1", "R@5", "R@10", "Rsum"} <= m.keys() and k not in RSUM_WHITELIST:
            s = m["R@1"] + m["R@5"] + m["R@10"]
            if abs(s - m["Rsum"]) > 0.15: errs.append(f"{k}: R@1+R@5+R@10 = {s:.1f}, Rsum = {m['Rsum']}")
    return errs


def test_rsum_is_the_sum_of_recalls():
    recs = read("diffusionret") + read("dits")
    n = sum(r["metric"] == "Rsum" for r in recs)
    assert n > 70
    assert rsum_errors(recs) == []


def test_rsum_check_catches_a_typo():
    recs = [dict(r) for r in read("diffusionret")]
    r = next(r for r in recs if r["table"] == "2" and r["row"] == "HBI" and r["column"] == "DiDeMo" and r["metric"] == "R@5")
    r["value"] = "79.4"                                            # printed 74.9
    errs = rsum_errors(recs)
    assert len(errs) == 1 and "HBI" in errs[0] and "DiDeMo" in errs[0]


def _vals(recs, table, row, column, metrics):
    got = {r["metric"]: r["value"] for r in recs if (r["table"], r["row"], r["column"]) == (table, row, column)}
    return [got.get(m) for m in metrics]


def test_numbers_the_papers_repeat_agree():
    "A number printed in several places (a default setting, a quoted baseline) is transcribed the same everywhere."
    d, s = read("diffusionret"), read("dits")
    m4, m5 = ["R@1", "R@5", "R@10", "MnR"], ["R@1", "R@5", "R@10", "MdR", "MnR"]
    ours = _vals(d, "1", "DiffusionRet (Ours)", "Text-to-Video", m4)
    for t, row in (("3a", "KL"), ("3b", "DDIM"), ("3c", "Cosine"), ("3d", "Both Gen and Dis"), ("3f", "1.0")):
        assert _vals(d, t, row, "Text-to-Video", m4) == ours, t                       # the defaults of Table 3
    assert _vals(d, "3e", "50", "50", ["R@1"]) == ours[:1]
    assert _vals(d, "4", "DiffusionRet (Ours), 50 steps", "1,000", ["R@1"]) == ours[:1]
    for t in ("5", "B"):
        assert _vals(d, t, "DiffusionRet (Ours)", "MSRVTT", ["R@1", "R@5", "R@10", "MdR"]) == \
            _vals(d, "1", "DiffusionRet (Ours)", "Text-to-Video", ["R@1", "R@5", "R@10", "MdR"]), t
    # DITS quotes DiffusionRet (Tables 1, 2) and X-Pool as DiffusionRet prints them
    for t, col, dt, dcol in (("1", "Text-to-Video", "1", "MSRVTT"), ("2", "LSMDC", "1", "LSMDC"), ("2", "DiDeMo", "2", "DiDeMo")):
        assert _vals(s, dt, "DiffusionRet, CLIP-ViT-B/32", dcol, m5) == _vals(d, t, "DiffusionRet (Ours)", col, m5), dcol
    assert _vals(s, "1", "X-Pool, CLIP-ViT-B/32", "MSRVTT", m5) == _vals(d, "1", "X-Pool", "Text-to-Video", m5)
    # within DITS: its main result, and the X-Pool baseline, wherever they reappear
    dits = _vals(s, "1", "DITS, CLIP-ViT-B/32", "MSRVTT", m5)
    base = _vals(s, "1", "X-Pool, CLIP-ViT-B/32", "MSRVTT", m5)
    for t, row, want in (("4", "DITS", dits), ("5a", "10", dits), ("5b", "DITS (Joint train)", dits), ("4", "Baseline (X-Pool)", base),
                         ("5a", "0", base), ("5b", "Baseline w/o DITS", base), ("6a", "w/o alignment", base),
                         ("6b", "w/o alignment", base), ("7", "Baseline w/o alignment", base),
                         ("7", "Pretrained diffusion, L2", _vals(s, "4", "Diffusion, pretrain", "MSRVTT", m5)),
                         ("6b", "v − t", _vals(s, "6a", "w/o condition", "MSRVTT", m5))):
        assert _vals(s, t, row, "MSRVTT", m5) == want, (t, row)
    for row, r1 in (("DITS fix CLIP", _vals(s, "5b", "DITS (Fix CLIP)", "MSRVTT", ["R@1"])), ("DITS", dits[:1])):
        assert _vals(s, "9", row, "MSRVTT", ["R@1"]) == r1, row
    for row in ("X-Pool", "DiffusionRet", "T-MASS", "DITS"):
        assert _vals(s, "11", row, "MSRVTT", ["R@1"]) == _vals(s, "1", f"{row}, CLIP-ViT-B/32", "MSRVTT", ["R@1"]), row


# ---------------------------------------------------------------- against the text


class Printed(NamedTuple):
    "One printed row (or, for a transposed table, column) of a table: its cells and their (column, metric)."
    table: str
    row: str
    layout: list            # [(column, metric)] for each cell
    cells: list             # the printed cells, normalised: "-" not reported, "×" failed, thousands commas dropped
    where: str              # for messages
    note: str | None = None  # the note every CSV record of the row must carry, where the table prints it (DITS Table 4)


def _norm_cell(c: str) -> str:
    c = c.strip().replace("\\times", CROSS)
    if c in ("-", "–", "—"): return "-"
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", c)


def _metric(c: str) -> str:
    return re.sub(r"\s*(↑|↓|\\uparrow|\\downarrow)\s*$", "", c.strip()).strip()


def _label(c: str) -> str:
    c = re.sub(r"<small>.*?</small>|_\{.*?\}|\[[^\]]*\]", "", c)
    return re.sub(r"\s+", " ", c).strip()


def _is_metric(c: str) -> bool: return bool(re.fullmatch(r"R@\d+|Rsum|MdR|MnR", _metric(c)))


def parse_diffusionret(text: str) -> list[Printed]:
    """Every printed row of the tab-separated tables, in reading order. A block of tab-separated lines belongs to the
    next caption after it: "Table N:" or a sub-caption "(x)" (then the table is the number of the next "Table N:"
    caption plus the letter, and a line holding several sub-tables side by side gives x, x+1, ...)."""
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        if "\t" not in lines[i]: i += 1; continue
        j = i
        while j < len(lines) and "\t" in lines[j]: j += 1
        block, first = lines[i:j], i + 1
        k = j
        while k < len(lines) and (not lines[k].strip() or "\t" in lines[k]): k += 1
        cap = re.match(r"\((\w)\) |Table (\w+):", lines[k])
        assert cap, f"no caption after the table at line {first}: {lines[k][:60]!r}"
        letter = cap.group(1) or ""
        number = cap.group(2) or next(m.group(1) for ln in lines[k:] if (m := re.match(r"Table (\w+):", ln)))
        out += _parse_block(block, first, number, letter)
        i = j
    return out


def _parse_block(block: list[str], first: int, number: str, letter: str) -> list[Printed]:
    rows = [ln.split("\t") for ln in block]
    if rows[0][1:2] == ["eval"]:                       # 3e: train steps down, eval steps across, R@1 (its sub-caption)
        assert rows[2][0] == "train"
        layout = [[(_metric(c), "R@1") for c in rows[1][1:]]]
        labels, body = [[0]], 3
    elif any(_is_metric(c) for c in rows[0]):          # one header line of metrics, sub-tables side by side (3a-3d, 3f)
        head = rows[0]
        labels, layout = [], []
        for p, c in enumerate(head):
            if _is_metric(c): layout[-1].append(("Text-to-Video", _metric(c)))
            else: labels.append([p]); layout.append([])
        body = 1
    else:                                              # a group line (dataset, direction, gallery) over a metric line
        groups, mets = rows[0], rows[1]
        assert len(groups) == len(mets), f"line {first}"
        labels, layout, group = [[]], [[]], None
        for p, (g, m) in enumerate(zip(groups, mets)):
            if g.strip(): group = re.sub(r"^Candidate gallery size is ", "", g.strip())
            if not m.strip(): labels[-1].append(p)
            else: layout[-1].append((group, _metric(m)))
        body = 2
    out = []
    for n, cells in enumerate(rows[body:], start=first + body):
        assert len(cells) == len(rows[body - 1]), f"line {n}: {len(cells)} cells, the header has {len(rows[body - 1])}"
        for s, (lab, lay) in enumerate(zip(labels, layout)):
            label = _label(cells[lab[0]])
            if len(lab) == 2 and cells[lab[1]].strip() != CROSS: label += f", {cells[lab[1]].strip()} steps"   # Table 4
            start = lab[-1] + 1
            out.append(Printed(number + (chr(ord(letter) + s) if letter else ""), label, lay,
                               [_norm_cell(c) for c in cells[start:start + len(lay)]], f"line {n}"))
    return out


MET5 = ["R@1", "R@5", "R@10", "MdR", "MnR"]   # the five numbers of a dataset cell ("Metrics: R@1, R@5, R@10 ..., MdR, MnR")


def parse_dits(md: str) -> list[Printed]:
    "Every printed row of the markdown tables (Table 5a, printed transposed, by column), in reading order."
    out, tid, title, backbone, head = [], None, "", None, None
    for n, ln in enumerate(md.split("\n"), start=1):
        if ln.startswith("## "):
            m = re.match(r"## Table (\w+)", ln)
            tid, title, backbone, head = (m.group(1) if m else None), ln, None, None
            continue
        if tid is None or not ln.strip(): continue
        if not ln.startswith("|"): backbone, head = ln.strip(), None; continue
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if set("".join(cells)) <= {"-"}: continue
        if head is None: head = cells; continue
        if head[0] == "T′":                              # transposed: one metric per line, one T′ per column
            for tp, v in zip(head[1:], cells[1:]):
                out.append(Printed(tid, tp, [("MSRVTT", cells[0])], [_norm_cell(v)], f"line {n}"))
            continue
        layout, vals, flags, label = [], [], [], cells[0]
        for h, v in zip(head[1:], cells[1:]):
            toks = v.split()
            if toks and set(toks) <= {"✓", "✗"}: flags.append(f"{h} {v}"); continue
            if h in ("MSRVTT", "LSMDC", "DiDeMo", "VATEX"):
                cols, mets = [h] * 5, MET5
                label = f"{cells[0]}, {backbone}"
            elif re.fullmatch(r"ViT-B/\d+", h):            # Table 3 (Charades): the backbones across
                cols, mets = ["Charades"] * 5, MET5
                label = f"{cells[0]}, CLIP-{h}"
                assert "Charades" in title
            else:                                          # metrics across: one per header cell, or several in one
                assert "MSRVTT" in title, title
                mets = h.split() if all(_is_metric(t) for t in h.split()) else [_metric(h)]
                cols = ["MSRVTT"] * len(mets)
            if toks in (["–"], ["-"]): toks = ["-"] * len(mets)
            assert len(toks) == len(mets), f"line {n}: {v!r} under {h!r}"
            if h.startswith("ViT-B/"):                     # two backbones on one line: one printed row each
                out.append(Printed(tid, label, list(zip(cols, mets)), [_norm_cell(t) for t in toks], f"line {n}"))
                continue
            layout += list(zip(cols, mets)); vals += [_norm_cell(t) for t in toks]
        if layout: out.append(Printed(tid, label, layout, vals, f"line {n}", "; ".join(flags) if flags else None))
    return out


def check(recs: list[dict], printed: list[Printed]) -> list[str]:
    """Every (table, row) of the CSV rebuilt as each printed row holding it, compared cell by cell; every CSV record
    must be a printed cell and every printed row must be in the CSV. Returns the mismatches (empty: all agree)."""
    by = defaultdict(dict)
    for r in recs: by[r["table"], r["row"]][r["column"], r["metric"]] = r
    lines = defaultdict(list)
    for p in printed:
        if set(p.cells) != {"-"}: lines[p.table, p.row].append(p)     # a cell of dashes only (DITS) is no row
    errs = []
    for (t, row), cells in by.items():
        if (t, row) not in lines: errs.append(f"table {t} row {row!r}: not printed in the paper's text"); continue
        used = set()
        for p in lines[t, row]:
            want = []
            for ck in p.layout:
                r = cells.get(ck)
                want.append("-" if r is None else r["value"] if r["value"] != "" else CROSS if r["note"].startswith(CROSS) else "?")
                if r is not None:
                    used.add(ck)
                    if p.note is not None and r["note"] != p.note:
                        errs.append(f"table {t} row {row!r} {ck}: note {r['note']!r}, the paper prints {p.note!r} ({p.where})")
            if want != p.cells:
                diff = [f"{c}/{m}: CSV {w!r}, paper {g!r}" for (c, m), w, g in zip(p.layout, want, p.cells) if w != g]
                errs.append(f"table {t} row {row!r} ({p.where}): " + "; ".join(diff))
        for ck in cells.keys() - used: errs.append(f"table {t} row {row!r} {ck}: no such printed cell")
    for t, row in lines.keys() - by.keys(): errs.append(f"table {t} row {row!r}: printed in the paper, missing from the CSV")
    return errs


def paper_order(printed: list[Printed], paper: str) -> list[tuple]:
    """The (table, row, column, metric) of every printed number in paper order: table order, then rows in the order
    they first appear, then (columns, metrics) in the order printed."""
    ks = [(p.table, p.row) + ck for p in printed for ck, c in zip(p.layout, p.cells) if c != "-"]
    first = {}
    for k in ks: first.setdefault(k[:2], len(first))
    return sorted(ks, key=lambda k: (TABLES[paper].index(k[0]), first[k[:2]]))


@pytest.fixture(scope="module")
def diffusionret_printed(): return parse_diffusionret(paper_text(DIFFRET_TXT))


@pytest.fixture(scope="module")
def dits_printed(): return parse_dits(paper_text(DITS_MD))


def test_the_text_parses_into_every_table(diffusionret_printed, dits_printed):
    assert list(dict.fromkeys(p.table for p in diffusionret_printed)) == ["1", "2", "3a", "3b", "3c", "3d", "3e", "3f", "4", "5", "A", "B"]
    assert {p.table for p in dits_printed} == set(TABLES["dits"])
    assert len(diffusionret_printed) == 14 + 15 + 2 * 3 + 4 + 4 + 5 + 9 + 3 + 11 + 3


def test_diffusionret_matches_the_text(diffusionret_printed):
    assert check(read("diffusionret"), diffusionret_printed) == []


def test_dits_matches_the_text(dits_printed):
    assert check(read("dits"), dits_printed) == []


@pytest.mark.parametrize("paper", ["diffusionret", "dits"])
def test_rows_are_in_paper_order(paper, diffusionret_printed, dits_printed):
    printed = diffusionret_printed if paper == "diffusionret" else dits_printed
    assert [key(r)[1:] for r in read(paper)] == paper_order(printed, paper)


def _corrupt(recs, table, row, column, metric, new):
    out = [dict(r) for r in recs]
    hit = [r for r in out if (r["table"], r["row"], r["column"], r["metric"]) == (table, row, column, metric)]
    assert len(hit) == 1
    hit[0].update(new)
    return out


@pytest.mark.parametrize("table,row,column,metric,new", [
    ("1", "DiffusionRet (Ours)", "Text-to-Video", "R@1", {"value": "49.1"}),
    ("1", "TABLE", "Video-to-Text", "MnR", {"value": "11"}),                    # printed precision is part of the number
    ("2", "CLIP4Clip", "DiDeMo", "MdR", {"value": "3.0"}),                     # second block of Table 2
    ("A", "EMCL-Net", "DiDeMo", "R@10", {"column": "ActivityNet Captions"}),    # a number under the wrong dataset
    ("3b", "DDIM", "Text-to-Video", "R@5", {"value": "75.3"}),                  # a sub-table in the middle of a line
    ("3e", "10", "50", "R@1", {"value": "48.7", "note": ""}),                   # a × cell given a number
    ("4", "DiffusionRet (Ours), 30 steps", "3,000", "GPU Memory (M)", {"value": "3774"}),
    ("5", "EMCL-Net", "MSRVTT->LSMDC", "MdR", {"value": "21.0"}),
    ("B", "DiffusionRet (Ours)", "MSRVTT->ActivityNet Captions", "Rsum", {"value": "163.5"}),
])
def test_diffusionret_check_catches_a_typo(diffusionret_printed, table, row, column, metric, new):
    recs = read("diffusionret")
    assert check(recs, diffusionret_printed) == []
    errs = check(_corrupt(recs, table, row, column, metric, new), diffusionret_printed)
    assert errs and all(f"table {table} row {row!r}" in e for e in errs), errs


def test_diffusionret_check_catches_swaps_drops_and_extras(diffusionret_printed):
    recs = read("diffusionret")
    i = next(n for n, r in enumerate(recs) if (r["table"], r["row"], r["metric"]) == ("1", "HBI", "MdR"))
    a, b = dict(recs[i]), dict(recs[i + 1])                 # MdR and MnR of the same row, swapped
    assert b["metric"] == "MnR"
    a["value"], b["value"] = b["value"], a["value"]
    assert check(recs[:i] + [a, b] + recs[i + 2:], diffusionret_printed)
    assert any("'TT-CE'" in e for e in check([r for r in recs if not (r["table"] == "2" and r["row"] == "TT-CE"
                                                                        and r["metric"] == "R@5")], diffusionret_printed))
    extra = dict(recs[0], column="Text-to-Video", metric="MnR", row="FROZEN", value="12.0")   # FROZEN prints "-" there
    assert any("'FROZEN'" in e for e in check(recs + [extra], diffusionret_printed))
    assert any("missing from the CSV" in e for e in check([r for r in recs if r["row"] != "HBI" or r["table"] != "A"],
                                                          diffusionret_printed))


@pytest.mark.parametrize("table,row,column,metric,new", [
    ("1", "DITS, CLIP-ViT-B/16", "LSMDC", "MnR", {"value": "38.5"}),
    ("2", "UCOFIA, CLIP-ViT-B/32", "VATEX", "MnR", {"metric": "MdR"}),
    ("3", "X-Pool, CLIP-ViT-B/16", "Charades", "R@10", {"value": "53.3"}),
    ("4", "DITS", "MSRVTT", "R@1", {"note": "alignment ✓; L2 ✗; L_sce ✓; truncation ✗"}),        # prints truncation ✓
    ("5a", "10", "MSRVTT", "R@1", {"value": "51.1"}),
    ("6b", "t − v", "MSRVTT", "MnR", {"value": "18.6"}),
    ("9", "DITS", "MSRVTT", "mean similarity", {"value": "0.186"}),
    ("10", "X-Pool", "MSRVTT", "GPU memory (MB)", {"value": "18968"}),
    ("11", "DITS", "MSRVTT", "time (s)", {"value": "70.71"}),
])
def test_dits_check_catches_a_typo(dits_printed, table, row, column, metric, new):
    recs = read("dits")
    assert check(recs, dits_printed) == []
    errs = check(_corrupt(recs, table, row, column, metric, new), dits_printed)
    assert errs and all(f"table {table} row {row!r}" in e for e in errs), errs
