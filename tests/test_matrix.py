"""Tests for the MTIL accuracy matrix and its metrics (mtil.evaluation.matrix)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mtil.evaluation import matrix as M

ORDER = ["A", "B", "C"]

# Hand-computed 3-task example (rows = after_task, columns = A, B, C in training order):
#   row 0 (zero-shot): [10, 20, 30]
#   row 1 (after A):   [80, 25, 35]
#   row 2 (after B):   [70, 90, 40]
#   row 3 (after C):   [60, 85, 95]
GRID = {0: [10, 20, 30], 1: [80, 25, 35], 2: [70, 90, 40], 3: [60, 85, 95]}
# Transfer   = mean( mean(A1[B]) , mean(A1[C], A2[C]) ) = mean(25, (35+40)/2 = 37.5) = 31.25
# Avg        = rows 1..3: (80+25+35) + (70+90+40) + (60+85+95) = 140 + 200 + 240 = 580; 580/9 = 64.444...
# Last       = (60 + 85 + 95) / 3 = 240 / 3 = 80
# Forgetting = mean( max(A1[A], A2[A]) - A3[A], max(A2[B]) - A3[B] ) = mean(80-60, 90-85) = mean(20, 5) = 12.5
# BWT        = mean( A3[A] - A1[A], A3[B] - A2[B] ) = mean(60-80, 85-90) = mean(-20, -5) = -12.5
# zero_shot  = (10 + 20 + 30) / 3 = 20
EXPECTED = {"transfer": 31.25, "avg": 580 / 9, "last": 80.0, "forgetting": 12.5, "bwt": -12.5, "zero_shot": 20.0}


def make_long(grid: dict[int, list[float]], order: list[str] = ORDER) -> pd.DataFrame:
    """Long-format matrix from {after_task: [top1 per dataset in order]} (top5 = top1 + 5)."""
    return pd.DataFrame([{"after_task": i, "dataset": d, "top1": float(v), "top5": float(v) + 5}
                         for i, vals in grid.items() for d, v in zip(order, vals)],
                        columns=list(M.MATRIX_COLUMNS))


def assert_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == {"transfer", "avg", "last", "forgetting", "bwt", "zero_shot"}
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value), key


def test_summarize_hand_computed() -> None:
    assert_metrics(M.summarize(make_long(GRID), ORDER), EXPECTED)


def test_summarize_row_order_in_frame_irrelevant() -> None:
    long = make_long(GRID).sample(frac=1.0, random_state=0)
    assert_metrics(M.summarize(long, ORDER), EXPECTED)


def test_forgetting_uses_max_not_diagonal() -> None:
    # Row 2 becomes [85, 90, 40]: A improved on A after training B, so forgetting != -BWT.
    # Forgetting = mean( max(80, 85) - 60, 90 - 85 ) = mean(25, 5) = 15
    # BWT        = mean( 60 - 80, 85 - 90 ) = -12.5 (diagonal, unchanged)
    # Avg        = (140 + 215 + 240) / 9 = 595 / 9
    grid = {**GRID, 2: [85, 90, 40]}
    got = M.summarize(make_long(grid), ORDER)
    assert got["forgetting"] == pytest.approx(15.0)
    assert got["bwt"] == pytest.approx(-12.5)
    assert got["avg"] == pytest.approx(595 / 9)


def test_without_row0_zero_shot_nan() -> None:
    grid = {i: v for i, v in GRID.items() if i > 0}
    assert_metrics(M.summarize(make_long(grid), ORDER), {**EXPECTED, "zero_shot": math.nan})


def test_extra_datasets_ignored() -> None:
    long = make_long(GRID)
    extras = pd.DataFrame([{"after_task": i, "dataset": "X", "top1": 1.0 + i, "top5": 2.0} for i in range(4)])
    long = pd.concat([long, extras], ignore_index=True)
    assert_metrics(M.summarize(long, ORDER), EXPECTED)
    wide = M.to_wide(long, ORDER)
    assert list(wide.columns) == ["A", "B", "C", "X"]
    assert list(wide.index) == [0, 1, 2, 3]
    assert wide.loc[2, "B"] == 90.0 and wide.loc[3, "X"] == 4.0
    assert M.to_wide(long, ORDER, value="top5").loc[1, "A"] == 85.0


def test_missing_cell_raises_with_names() -> None:
    long = make_long(GRID)
    long = long[~((long.after_task == 2) & (long.dataset == "B"))]
    long = long[~((long.after_task == 3) & (long.dataset == "C"))]
    with pytest.raises(ValueError) as err:
        M.summarize(long, ORDER)
    assert "(2, 'B')" in str(err.value) and "(3, 'C')" in str(err.value)


def test_nan_top1_counts_as_missing_and_partial_row0_raises() -> None:
    long = make_long(GRID)
    long.loc[(long.after_task == 1) & (long.dataset == "C"), "top1"] = float("nan")
    with pytest.raises(ValueError, match=r"\(1, 'C'\)"):
        M.summarize(long, ORDER)
    long = make_long(GRID)
    long = long[~((long.after_task == 0) & (long.dataset == "A"))]
    with pytest.raises(ValueError, match=r"\(0, 'A'\)"):
        M.summarize(long, ORDER)


def test_partial_run() -> None:
    # Rows 0..2 only (task C not trained yet); latest row k = 2.
    # Last       = (70 + 90 + 40) / 3 = 200 / 3
    # Transfer   = mean(25, mean(35, 40)) = 31.25 (all its cells exist already)
    # Avg        = (140 + 200) / 6 = 340 / 6
    # Forgetting = (so far, j = 1) max(A1[A]) - A2[A] = 80 - 70 = 10
    # BWT        = (so far, j = 1) A2[A] - A1[A] = -10
    long = make_long({i: GRID[i] for i in (0, 1, 2)})
    with pytest.raises(ValueError, match="missing 3"):
        M.summarize(long, ORDER)
    got = M.summarize(long, ORDER, partial=True)
    assert_metrics(got, {"transfer": 31.25, "avg": 340 / 6, "last": 200 / 3, "forgetting": 10.0,
                         "bwt": -10.0, "zero_shot": 20.0})
    # Only zero-shot so far: nothing trained, so last/forgetting/bwt/transfer/avg are NaN.
    got0 = M.summarize(make_long({0: GRID[0]}), ORDER, partial=True)
    assert got0["zero_shot"] == pytest.approx(20.0)
    assert all(math.isnan(got0[k]) for k in ("transfer", "avg", "last", "forgetting", "bwt"))


def test_rows_beyond_order_raise() -> None:
    with pytest.raises(ValueError, match="beyond"):
        M.summarize(make_long(GRID), ["A", "B"])


def test_single_task() -> None:
    # n == 1: Transfer/Forgetting/BWT undefined (NaN); Avg = Last = A1[A] = 80; zero-shot 10.
    long = make_long({0: [10], 1: [80]}, ["A"])
    got = M.summarize(long, ["A"])
    assert_metrics(got, {"transfer": math.nan, "avg": 80.0, "last": 80.0, "forgetting": math.nan,
                         "bwt": math.nan, "zero_shot": 10.0})


def test_upsert_replaces_never_duplicates() -> None:
    long = make_long(GRID)
    out = M.upsert_rows(long, [{"after_task": 2, "dataset": "B", "top1": 91.0, "top5": 99.0},
                               {"after_task": 4, "dataset": "D", "top1": 5.0, "top5": 6.0}])
    assert len(out) == len(long) + 1
    assert not out.duplicated(["after_task", "dataset"]).any()
    cell = out[(out.after_task == 2) & (out.dataset == "B")]
    assert cell.top1.tolist() == [91.0] and cell.top5.tolist() == [99.0]
    # Upserting again (and into an empty matrix) is idempotent.
    again = M.upsert_rows(out, out)
    assert len(again) == len(out)
    assert len(M.upsert_rows(M.empty_matrix(), long)) == len(long)


def test_write_read_round_trip(tmp_path: Path) -> None:
    long = make_long(GRID).iloc[::-1].reset_index(drop=True)
    long.loc[long.index[0], "top5"] = float("nan")  # e.g. a dataset with < 5 classes
    extra = pd.DataFrame([{"after_task": 1, "dataset": "X,with comma", "top1": 12.3456, "top5": 50.0}])
    long = pd.concat([long, extra], ignore_index=True)
    path = tmp_path / "sub" / "matrix.csv"
    M.write_matrix(path, long, order=ORDER)
    lines = path.read_text().splitlines()
    assert lines[0] == "after_task,dataset,top1,top5"
    assert [ln.split(",")[:2] for ln in lines[1:4]] == [["0", "A"], ["0", "B"], ["0", "C"]]
    assert lines[4].startswith("1,A,") and lines[7].startswith('1,"X,with comma",')
    back = M.read_matrix(path)
    assert list(back.columns) == list(M.MATRIX_COLUMNS)
    assert back.after_task.dtype.kind == "i"
    key = ["after_task", "dataset"]
    a = long.sort_values(key).reset_index(drop=True)
    b = back.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False, atol=1e-4)
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temp file left behind


def test_summary_upsert_by_method(tmp_path: Path) -> None:
    path = tmp_path / "summary.csv"
    M.write_summary(path, [{"method": "finetune", **EXPECTED}])
    single = M.summarize(make_long({0: [10], 1: [80]}, ["A"]), ["A"])
    M.write_summary(path, [{"method": "zscl", **single}])
    M.write_summary(path, [{"method": "finetune", **{**EXPECTED, "last": 81.5}}])
    assert path.read_text().splitlines()[0] == "method,transfer,avg,last,forgetting,bwt,zero_shot"
    rows = M.read_summary(path)
    assert [r["method"] for r in rows] == ["finetune", "zscl"]
    assert rows[0]["last"] == pytest.approx(81.5)
    assert rows[0]["transfer"] == pytest.approx(31.25)
    assert math.isnan(rows[1]["transfer"]) and rows[1]["avg"] == pytest.approx(80.0)
    assert path.read_text().splitlines()[2] == "zscl,,80.0000,80.0000,,,10.0000"  # NaN -> empty
    text = M.format_summary(rows)
    assert "finetune" in text and "31.25" in text and "-" in text.splitlines()[2]
    assert M.read_summary(tmp_path / "absent.csv") == []


def test_format_matrix() -> None:
    long = make_long(GRID)
    long = long[~((long.after_task == 3) & (long.dataset == "C"))]
    text = M.format_matrix(long, ORDER)
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[1].startswith("zero-shot") and lines[2].startswith("after 1: A")
    assert lines[4].startswith("after 3: C") and lines[4].endswith("-")
    assert "90.0" in lines[3]


def test_heatmap_written(tmp_path: Path) -> None:
    path = tmp_path / "heat.png"
    long = make_long(GRID)
    long = long[~((long.after_task == 3) & (long.dataset == "C"))]  # a blank cell is fine
    M.plot_heatmap(long, ORDER, path, title="toy")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_matrix_from_results(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    lines = []
    for i, vals in GRID.items():
        for d, v in zip(ORDER, vals):
            lines.append({"dataset": d, "top1": v, "top5": v + 5, "after_task": i, "sequence": ORDER[:i]})
    # Mid-task evaluations (no after_task / null after_task) are ignored.
    lines.insert(5, {"dataset": "B", "top1": 1.0, "top5": 2.0, "iteration": 100, "sequence": ["A"]})
    lines.insert(6, {"dataset": "A", "top1": 1.0, "top5": 2.0, "after_task": None, "sequence": ["A"]})
    # An earlier, superseded evaluation of cell (2, "B") that a re-run replaces later.
    lines.insert(0, {"dataset": "B", "top1": 11.0, "top5": 12.0, "after_task": 2, "sequence": ["A", "B"]})
    path.write_text("".join(json.dumps({"time": "t", **rec, "config": {}}) + "\n" for rec in lines) + "\n")
    long, order = M.matrix_from_results(path)
    assert order == ORDER
    assert len(long) == 12 and not long.duplicated(["after_task", "dataset"]).any()
    assert long[(long.after_task == 2) & (long.dataset == "B")].top1.tolist() == [90.0]
    assert_metrics(M.summarize(long, order), EXPECTED)
    assert list(long.after_task) == sorted(long.after_task)


def test_matrix_from_results_partial_chain(tmp_path: Path) -> None:
    # One process per task: only rows 0..1 so far; the order is the longest sequence seen.
    path = tmp_path / "results.jsonl"
    recs = [{"dataset": d, "top1": v, "after_task": 0, "sequence": []} for d, v in zip(ORDER, GRID[0])]
    recs += [{"dataset": d, "top1": v, "after_task": 1, "sequence": ["A"]} for d, v in zip(ORDER, GRID[1])]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    long, order = M.matrix_from_results(path)
    assert order == ["A"]
    assert long.top5.isna().all()
    wide = M.to_wide(long, order)
    assert list(wide.columns) == ["A", "B", "C"]  # B, C are extras until trained
