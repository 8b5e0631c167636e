"""The benchmark scripts run: ``scripts/bench_train.py`` measures the distillation methods (no timing is asserted)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH_TRAIN = REPO / "scripts" / "bench_train.py"
ROW = re.compile(r"^\| (?P<method>[A-Za-z][\w-]*) \| (?P<seconds>[^|]+) \| (?P<rate>[^|]+) \| (?P<rss>[^|]+) \|")


def _rows(stdout: str) -> dict[str, dict[str, str]]:
    rows = {}
    for line in stdout.splitlines():
        match = ROW.match(line)
        if match and match["method"] != "method":
            rows[match["method"]] = {k: v.strip() for k, v in match.groupdict().items()}
    return rows


def test_bench_train_methods_table_icarl():
    """iCaRL reads raw images (the exemplars a previous task left; LwF reads the task's own the same way): it gets
    a table row with a positive time per step and RSS, and its step computed the distillation terms."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH_TRAIN), "--methods", "icarl", "--model", "tiny-vit",
                           "--batch-size", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--classes", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(done.stdout)
    assert set(rows) == {"icarl"}, done.stdout
    for method, row in rows.items():
        assert float(row["seconds"]) > 0, row
        assert float(row["rss"].removesuffix(" GiB")) > 0, row
        details = next(line for line in done.stdout.splitlines() if line.strip().startswith(f"{method}: method="))
        assert "distill_image" in details and "distill_text" in details, details
    icarl = next(line for line in done.stdout.splitlines() if line.strip().startswith("icarl: method="))
    memory = re.search(r"exemplar memory (\d+) images", icarl)
    assert memory and int(memory[1]) == 4, icarl  # every image of the previous task (4 < --memory-size)


def test_bench_train_training_free_method_is_reported_not_timed():
    sys.path.insert(0, str(BENCH_TRAIN.parent))
    try:
        import bench_train
    finally:
        sys.path.remove(str(BENCH_TRAIN.parent))
    with pytest.raises(bench_train.TrainingFree, match="training-free"):
        bench_train.prepare("tip-adapter", "tiny-vit", "whole", 2, "cpu", 4, 2, [])


def test_bench_integrity_reads_its_checkpoint_both_ways_and_writes_its_csv(tmp_path):
    """The verification benchmark runs end to end on a tiny model: both reads in its table, three CSV rows."""
    csv_path = tmp_path / "integrity.csv"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_integrity.py"), "--model", "micro-vit",
                           "--rounds", "1", "--folder", str(tmp_path), "--csv", str(csv_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| torch.load(weights_only=True), unverified |" in done.stdout
    assert "| mtil load_checkpoint, verified |" in done.stdout
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("date,commit,machine,command") and len(rows) == 4
