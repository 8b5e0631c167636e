"""What a cluster job shows and uses: the CPU-fallback warning, the default thread count, progress lines in a
log that is not a terminal, class and image counts of --eval-only."""
from __future__ import annotations

import os

import torch

from mtil import hardware
from mtil.main import main


def test_auto_device_falling_back_to_the_cpu_is_loud(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--model", "micro-vit", "--eval-only", "--eval-datasets", "ToyShape", "--max-evaluation-size", "8",
                 "--workers", "0", "--device", "auto"]) == 0
    assert "WARNING: --device auto found no CUDA GPU" in capsys.readouterr().err
    assert main(["--model", "micro-vit", "--eval-only", "--eval-datasets", "ToyShape", "--max-evaluation-size", "8",
                 "--workers", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().err == ""  # asked for the CPU: nothing to warn about


def test_default_threads_follow_affinity_and_slurm(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert hardware.default_threads() == 6
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert hardware.default_threads() == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")
    assert hardware.default_threads() == 6


def test_threads_flag_and_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert hardware.set_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert hardware.set_threads(None) == 1  # respected, not overridden by the affinity default
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(hardware, "default_threads", lambda: 3)
        assert hardware.set_threads(None) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_progress_lines_reach_a_log_that_is_not_a_terminal(tmp_path, capsys):
    save = tmp_path / "run"
    assert main(["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-3", "--warmup-length", "1",
                 "--max-evaluation-size", "8", "--workers", "0", "--device", "cpu", "--train-dataset", "ToyShape",
                 "--iterations", "4", "--log-every", "2", "--save", str(save)]) == 0
    out = capsys.readouterr().out  # captured: not a terminal, as in a SLURM log
    lines = [line for line in out.splitlines() if line.startswith("[ToyShape] step")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"]
    assert all(" ce " in line and " lr " in line and "img/s" in line and "ETA" in line for line in lines)
    assert "[ToyShape] step 2/4" in (save / "train.log").read_text()


def test_eval_only_says_how_many_classes_and_images(capsys):
    assert main(["--model", "micro-vit", "--eval-only", "--eval-datasets", "ToyShape", "--max-evaluation-size", "24",
                 "--workers", "0", "--device", "cpu"]) == 0
    assert "classes, 24 images)" in capsys.readouterr().out
