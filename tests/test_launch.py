"""python -m mtil.launch: torchrun's arguments, mtil's errors (issue 25: under torchrun a bad flag or missing data
was the worker's line followed by torch's ~30-line ChildFailedError report and exit code 1)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = ["--model", "micro-vit", "--device", "cpu", "--workers", "0", "--batch-size", "4", "--max-evaluation-size",
        "8", "--iterations", "2", "--warmup-length", "1", "--log-every", "0"]


def _launch(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtil.launch", "--nproc_per_node", "2", *argv], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=REPO)


def _one_error_line(done: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("mtil: error:") and fragment in lines[0], lines


def test_a_bad_flag_is_one_line_before_any_worker_starts():
    _one_error_line(_launch("-m", "mtil.main", *TINY, "--train-dataset", "ToyShape", "--lr", "-1"), "--lr")


def test_an_error_the_workers_meet_is_one_line_and_exit_2(tmp_path):
    done = _launch("-m", "mtil.main", *TINY, "--train-dataset", f"ImageFolder:{tmp_path / 'none'}")
    _one_error_line(done, "does not exist")


def test_a_run_on_two_processes_finishes(tmp_path):
    done = _launch("-m", "mtil.main", *TINY, "--train-dataset", "ToyShape", "--save", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "accuracy_matrix.csv").is_file() and "2 processes" in done.stdout


def test_another_failure_is_named_with_its_exit_code(tmp_path):
    done = _launch("-m", "zipfile", "-l", str(tmp_path / "missing.zip"))  # a traceback, exit code 1
    assert done.returncode == 1 and "mtil.launch: rank " in done.stderr and "exit code 1" in done.stderr
    assert "ChildFailedError" not in done.stderr


def test_verbose_belongs_to_the_launcher_only_before_the_script():
    from mtil.launch import _split_verbose

    assert _split_verbose(["--verbose", "--nproc_per_node", "2", "-m", "mtil.main", "--verbose"]) == \
        (["--nproc_per_node", "2", "-m", "mtil.main", "--verbose"], True)
    assert _split_verbose(["--nproc_per_node", "2", "train.py", "--verbose"])[1] is False


def test_only_rank_0_speaks_under_torchrun_and_srun(monkeypatch, capsys):
    """The rank comes from RANK with WORLD_SIZE (torchrun) or SLURM_PROCID in a step of several tasks (srun)."""
    from mtil.main import main

    argv = ["--model", "micro-vit", "--eval-only", "--eval-datasets", "ToyShape", "--device", "cpu"]
    for variable in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert main(argv) == 2 and capsys.readouterr().err == ""  # srun's rank 1: silent
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert main(argv) == 2 and "only training runs on several processes" in capsys.readouterr().err


def test_an_error_only_another_rank_meets_is_said_by_the_launcher(tmp_path):
    """Only rank 0 prints mtil's line; an error rank 0 does not meet (e.g. a GPU missing for local rank 2) reaches
    the user through the rank's error file (found in review: it was said by nobody)."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text("import os, sys\n"
                      "from mtil.main import _error\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    _error('only rank 1 meets this')\n"
                      "    sys.exit(2)\n")
    done = _launch(str(script))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["mtil: error: only rank 1 meets this (rank 1)"], lines
