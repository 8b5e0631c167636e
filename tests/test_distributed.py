"""Data-parallel training through ``python -m mtil.main``: 2 processes with gloo on the CPU.

One command (2 tasks of micro-vit, global batch 4 = 2 draws per rank) is run four ways:

* in this process, alone (the reference);
* under ``torchrun --nproc_per_node=2`` through this file's driver (``python -m tests.test_distributed``, below),
  which records every file each rank opens for writing under ``--save`` and dumps each rank's final weights;
* as two processes started like ``srun`` does (``SLURM_PROCID`` ...), SIGTERM to rank 1 only, mid-task; both must
  stop after the same step and exit 3 with rank 0's ``latest.pth``;
* that folder resumed under torchrun: it must end bit-identical to the uninterrupted 2-rank run.

The comparison with one process uses SGD: each rank's mean over its 2 images, averaged by DDP, equals the mean over
4 up to float rounding (measured 4e-7 on the weights here). AdamW divides by sqrt(v), which magnifies those
rounding differences in near-zero gradients (2.9e-3 after 12 steps), so it would test Adam, not the sharding.
The other methods' runs are settings where one process is itself stable under rounding: with ``--lr-mult-text
0.5`` at lr 0.05 one process on 1 thread and on 2 threads ends 7.7e-4 apart (a chaotic trajectory amplifies any
last-bit difference), so such a setting could not tell a sharding error from rounding.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mtil.engine.data_stream import DrawSampler
from mtil.evaluation import matrix as mx
from mtil.main import main

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30
COMMAND = ["--model", "micro-vit", "--train-dataset", "ToyShape,ToyColor", "--iterations", str(STEPS),
           "--batch-size", "4", "--optimizer", "sgd", "--lr", "0.05", "--warmup-length", "2",
           "--max-evaluation-size", "24", "--batch-size-eval", "8", "--workers", "0", "--device", "cpu",
           "--threads", "1", "--checkpoint-interval", "0", "--log-every", "10"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "TORCHELASTIC_RUN_ID")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _cells(save: Path) -> pd.DataFrame:
    return mx.matrix_from_results(save / "results.jsonl")[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The single-process reference and the uninterrupted 2-rank run (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("ddp")
    single = tmp / "single"
    assert main([*COMMAND, "--save", str(single)]) == 0
    two, report = tmp / "two", tmp / "report"
    done = _torchrun(["-m", "tests.test_distributed", str(report), *COMMAND, "--save", str(two)], ROOT)
    return {"tmp": tmp, "single": single, "two": two, "report": report, "out": done.stdout}


def test_two_ranks_hold_identical_weights_and_only_rank_0_writes(runs):
    report = runs["report"]
    rank0, rank1 = _weights(report / "rank0.pt"), _weights(report / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
    saved = _weights(runs["two"] / "latest.pth")["model"]
    moved = [n for n in saved if not torch.equal(saved[n], _weights(runs["two"] / "ToyShape.pth")["model"][n])]
    assert moved, "task 2 changed nothing: the comparison would prove nothing"
    for name in saved:
        assert torch.equal(saved[name], rank1[name]), f"rank 0's checkpoint is not what rank 1 held ({name})"
    writes = [json.loads((report / f"writes{r}.json").read_text()) for r in (0, 1)]
    assert writes[1] == [], f"rank 1 wrote under --save: {writes[1]}"
    assert any(w.endswith("latest.pth") for w in writes[0]), writes[0]  # the recorder sees rank 0's writes
    assert runs["out"].count("[after task 2]") == 1  # one rank prints


def test_two_ranks_give_the_single_process_matrix(runs):
    pd.testing.assert_frame_equal(_cells(runs["two"]), _cells(runs["single"]), check_exact=True)
    assert _cells(runs["single"])["top1"].nunique() > 1  # the matrix is not one constant value
    one, two = _weights(runs["single"] / "latest.pth")["model"], _weights(runs["two"] / "latest.pth")["model"]
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)


def test_a_rank_stopped_by_sigterm_stops_all_and_the_run_resumes_exactly(runs):
    save = runs["tmp"] / "preempted"
    port = str(_free_port())
    argv = [sys.executable, "-m", "mtil.main", *COMMAND, "--save", str(save)]
    procs = [subprocess.Popen(argv, cwd=runs["tmp"], env=_env(SLURM_PROCID=str(r), SLURM_STEP_NUM_TASKS="2",
                                                              SLURM_LOCALID=str(r), MASTER_ADDR="127.0.0.1",
                                                              MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not (save / "latest.pth").is_file():  # written after the zero-shot row: training starts now
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns it from the vote
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [3, 3], outs
    assert "stopped by another process" in outs[0] and "latest checkpoint saved" in outs[0], outs[0]
    latest = _weights(save / "latest.pth")
    step = latest["state"]["step"]  # the request is met at the next step, or right after the zero-shot row
    assert step < STEPS and ("optimizer" in latest if step else latest["state"]["zero_shot_evaluated"]), \
        latest["state"]

    resumed = _torchrun(["-m", "mtil.main", *COMMAND, "--save", str(save)], runs["tmp"])
    if step:
        assert f"at step {step}/{STEPS}" in resumed.stdout, resumed.stdout
    pd.testing.assert_frame_equal(_cells(save), _cells(runs["two"]), check_exact=True)
    for name in ("ToyShape.pth", "ToyColor.pth"):
        want, got = _weights(runs["two"] / name)["model"], _weights(save / name)["model"]
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs after the resume"


# Every method and component that declares it works on several processes, in 3 runs (LwF and LwF-VR share
# ZSCL's and iCaRL's distillation code; finetune and joint are means over the batch, above): the methods' own shared
# state (iCaRL's exemplars, OGD's basis, CLIP-AST's selection, the teachers) and the whole-batch terms (ZSCL's text
# direction and image-image ablation gathered from both ranks) are what these compare beyond fine-tuning.
METHOD_RUNS = {
    "ZSCL+l2+we+ogd+part-lr": ["--method", "ZSCL", "--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions",
                               "--ref-sentences-count", "50", "--image-image-loss", "--feature-mse", "--l2", "0.1",
                               "--we", "--avg-freq", "5", "--orthogonal-gradients", "2", "--lr-mult-vision", "0.5"],
    "icarl+ema+lora": ["--method", "icarl", "--memory-size", "8", "--ema", "0.9", "--lora"],
    # AST's L1 terms are left out: their gradient is sign(tuned - frozen), which float rounding between the two
    # runs flips where tuned = frozen (measured 2e-5 apart after 32 steps with them, 3e-8 without)
    "ast+wise": ["--method", "ast", "--k", "2", "--stage1-epochs", "1", "--shots", "4", "--lmbd", "0", "0", "1",
                 "--wise-merge"],
}
SHORT = [*COMMAND[:COMMAND.index("--iterations")], "--iterations", "16",
         *COMMAND[COMMAND.index("--iterations") + 2:]]


def _states_equal(a, b, where: str) -> None:
    """Exact equality of nested method states (dicts, lists, tensors, plain values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _states_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _states_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_methods_on_two_ranks_match_one_process(tmp_path, name):
    """Both ranks end with identical weights and identical method state (exemplars, basis, selection); the
    weights are the single process's within float rounding (SGD; see the module docstring), its matrix exactly."""
    command = [*SHORT, *METHOD_RUNS[name]]
    single, two, report = tmp_path / "single", tmp_path / "two", tmp_path / "report"
    assert main([*command, "--save", str(single)]) == 0
    _torchrun(["-m", "tests.test_distributed", str(report), *command, "--save", str(two)], ROOT)
    rank0, rank1 = _weights(report / "rank0.pt"), _weights(report / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
    states = [torch.load(report / f"methods{r}.pt", weights_only=True) for r in (0, 1)]
    _states_equal(states[0], states[1], "method state")
    one = _weights(single / "latest.pth")
    start = _weights(single / "ToyShape.pth")["model"]
    assert any(not torch.equal(one["model"][k], start[k]) for k in start), "task 2 trained nothing"
    for key, value in one["model"].items():
        torch.testing.assert_close(rank0[key], value, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {key}: {m}")
    pd.testing.assert_frame_equal(_cells(two), _cells(single), check_exact=True)
    if "icarl" in name:  # the same exemplars as one process chose (and both ranks hold them: above)
        assert states[0]["icarl"]["memory"] == one["methods"]["icarl"]["memory"]
        assert sum(map(len, states[0]["icarl"]["memory"].values())) == 8
    if "ast" in name:
        assert states[0]["ast"]["selections"].keys() == {"ToyShape", "ToyColor"}
        for task, record in one["methods"]["ast"]["selections"].items():
            assert states[0]["ast"]["selections"][task]["selected"] == record["selected"]
    if "ogd" in name:
        basis = states[0]["ogd"]["basis"]
        assert basis and all(b.shape[0] > 0 for b in basis.values())


def test_draw_shares_make_up_the_single_process_batches():
    one = list(DrawSampler(10, seed=3, stream=1, start=8, stop=24))
    shares = [list(DrawSampler(10, seed=3, stream=1, start=8, stop=24, rank=r, world=2)) for r in (0, 1)]
    for step in range(4):  # batch 4: each rank takes 2 draws of every global batch
        assert sorted(shares[0][2 * step:2 * step + 2] + shares[1][2 * step:2 * step + 2]) == \
            sorted(one[4 * step:4 * step + 4])


@pytest.mark.parametrize("extra, named", [
    (["--method", "contrastive", "--train-dataset", "ToyCaptions"], "contrastive"),
    (["--method", "ZSCL", "--ref-dataset", "ToyCaptions", "--ref-sentences", "ToyCaptions", "--ref-batch-size", "3"],
     "--ref-batch-size must be a multiple of the 2 processes"),
    (["--batch-size", "5"], "--batch-size must be a multiple of the 2 processes"),
])
def test_refusals_on_two_processes(monkeypatch, tmp_path, capsys, extra, named):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    save = tmp_path / "refused"
    assert main([*COMMAND, *extra, "--save", str(save)]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
    assert not save.exists()


def test_evaluation_alone_is_refused_on_two_processes(monkeypatch, capsys):
    """Refused on every rank (exit 2); rank 0 says why in one line, rank 1 stays silent (it meets the same error:
    N copies of the line would bury it)."""
    argv = ["--model", "micro-vit", "--eval-only", "--eval-datasets", "ToyShape", "--device", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 2
    assert "only training runs on several processes" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 2
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- the driver
def _drive(report: Path, argv: list[str]) -> int:
    """Run mtil as this rank; record its writes under --save (paths) and dump its final weights into ``report``."""
    import builtins

    from mtil.distributed import current_rank
    from mtil.engine.sequence import SequenceRunner

    save = Path(argv[argv.index("--save") + 1]).resolve()
    writes: list[str] = []

    def note(path, writing: bool) -> None:
        if writing and isinstance(path, (str, os.PathLike)) and Path(path).resolve().is_relative_to(save):
            writes.append(str(path))

    real_open, real_os_open, real_replace = builtins.open, os.open, os.replace
    builtins.open = lambda file, mode="r", *a, **k: (note(file, any(c in mode for c in "wax+")),
                                                     real_open(file, mode, *a, **k))[1]
    os.open = lambda path, flags, *a, **k: (note(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))),
                                            real_os_open(path, flags, *a, **k))[1]
    os.replace = lambda src, dst, *a, **k: (note(dst, True), real_replace(src, dst, *a, **k))[1]
    finished: dict = {}
    methods: dict = {}
    original_run = SequenceRunner.run

    def run(self):
        result = original_run(self)
        finished.update({n: p.detach().cpu().clone() for n, p in result.model.state_dict().items()})
        methods.update({c.name: c.state_dict() for c in self.components})
        return result

    SequenceRunner.run = run
    code = main(argv)
    builtins.open, os.open, os.replace = real_open, real_os_open, real_replace
    rank = current_rank()
    report.mkdir(parents=True, exist_ok=True)
    torch.save(finished, report / f"rank{rank}.pt")
    torch.save(methods, report / f"methods{rank}.pt")
    (report / f"writes{rank}.json").write_text(json.dumps(writes))
    return code


if __name__ == "__main__":
    sys.exit(_drive(Path(sys.argv[1]), sys.argv[2:]))
