"""A ``kill -9`` of ``mtil.sweep`` stops its running point too (issue 24): the point's ``mtil.main`` sees its
parent gone, saves its checkpoint at the next step and exits, so nothing keeps writing into the point folder a
resumed sweep will use (and a resumed sweep waits for a point folder still held, rather than share it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mtil.folder_lock import LOCK_NAME, holder

ROOT = Path(__file__).resolve().parent.parent
BASE = (f"{sys.executable} -m mtil.main --model micro-vit --train-dataset ToyShape --iterations 100000 "
        "--batch-size 8 --workers 0 --device cpu --max-evaluation-size 8 --log-every 0 --threads 1")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_killed_sweep_stops_its_running_point(tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = None
    sweep = subprocess.Popen([sys.executable, "-m", "mtil.sweep", "--base", BASE, "--grid", "lr=1e-4",
                              "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        assert _wait(lambda: any(holder(p.parent) for p in out.rglob(LOCK_NAME)), 90), "the point never started"
        folder = next(p.parent for p in out.rglob(LOCK_NAME))
        child = holder(folder)["pid"]
        assert _wait(lambda: (folder / "latest.pth").is_file(), 60)  # zero-shot row done: it is training now
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
        assert _wait(lambda: not _alive(child), 30), "the point outlived its sweep"
        assert holder(folder) is None and not (folder / LOCK_NAME).exists()  # released on its way out
    finally:
        sweep.kill()
        if child is not None and _alive(child):  # never leave a training process behind a failed test
            os.kill(child, signal.SIGKILL)
