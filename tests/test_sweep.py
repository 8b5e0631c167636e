"""Sweeps: grid expansion, bad grids refused before anything runs, skip-finished / resume, the tables, selection
on validation only, and ``--seeds`` on mtil.main end to end."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mtil.errors import UserError
from mtil.evaluation.selection import best, check_selection_split
from mtil.main import main as mtil_main
from mtil.sweep.cli import main as sweep
from mtil.sweep.grid import expand, parse_axis

FAKE = textwrap.dedent('''
    """A stand-in for a training run: writes fewshot.csv with val = 100 lr + seed and test = 100 - 100 lr + seed."""
    import argparse, csv, json, os, sys
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--shots", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fewshot-seed", type=int)
    parser.add_argument("--save", required=True)
    args = parser.parse_args()
    save = Path(args.save)
    save.mkdir(parents=True, exist_ok=True)
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps({"point": save.name, "argv": sys.argv[1:]}) + "\\n")
    if os.environ.get("FAKE_STOP") == save.name and not (save / "stopped").exists():
        (save / "stopped").write_text("")
        sys.exit(3)  # preempted: "re-run to resume"
    if os.environ.get("FAKE_FAIL") == save.name:
        sys.exit(1)
    if os.environ.get("FAKE_WAIT"):  # a long run: a stop signal makes it "save" and exit 3, as mtil does
        import signal, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
        (save / "waiting").write_text("")
        time.sleep(120)
    val, test = 100 * args.lr + args.seed, 100 - 100 * args.lr + args.seed
    with open(save / "fewshot.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["after_task", "dataset", "split", "classes", "top1", "top5", "images"])
        writer.writerow([0, "Toy", "test", "all", 1.0, 1.0, 10])
        writer.writerow([1, "Toy", "val", "all", val, 100, 4])
        writer.writerow([1, "Toy", "test", "all", test, 100, 10])
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_STOP", raising=False)
    monkeypatch.delenv("FAKE_FAIL", raising=False)

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []

    return f"{sys.executable} {script} --shots 2", calls


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_grid_is_every_combination_seeds_fastest_one_folder_each():
    points = expand([parse_axis("shots=1,2"), parse_axis("--lr=1e-5;1e-4")], seeds=[1, 2])
    assert [p.name for p in points] == [
        "shots=1_lr=1e-5_seed1", "shots=1_lr=1e-5_seed2", "shots=1_lr=1e-4_seed1", "shots=1_lr=1e-4_seed2",
        "shots=2_lr=1e-5_seed1", "shots=2_lr=1e-5_seed2", "shots=2_lr=1e-4_seed1", "shots=2_lr=1e-4_seed2"]
    assert points[3].columns == {"shots": "1", "lr": "1e-4", "seed": "2"}
    assert parse_axis("train_dataset=A,B;C").values == ("A,B", "C")  # ';' separates values that hold commas
    assert [p.name for p in expand([parse_axis("train-dataset=ImageFolder:/d/x")])] == [
        "train-dataset=ImageFolder-d-x"]


MTIL = f"{sys.executable} -m mtil.main --model micro-vit --device cpu --workers 0 --train-dataset ToyColorA " \
       f"--iterations 1"


@pytest.mark.parametrize("extra, expected", [
    (["--grid", "shots="], "empty value"),
    (["--grid", "lr=1,1"], "twice"),
    (["--grid", "lr=1", "--grid", "lr=2"], "twice"),
    (["--grid", "save=a,b"], "own --save"),
    (["--grid", "shot=1,2"], "no flag --shot"),
    (["--grid", "iterations=1,2"], "both in --base and in the grid"),
    (["--grid", "seed=1,2", "--seeds", "1,2"], "--seeds"),
    (["--grid", "base-new=true,maybe"], "true or false"),
    (["--grid", "lr=1e-4,-1"], "point lr=-1: argument --lr"),
    (["--grid", "lr=1e-4", "--select-on", "val"], "needs validation accuracies"),
    (["--grid", "shots=1", "--select-on", "test"], "test split is refused"),
    (["--grid", "shots=1", "--select-per", "lr"], "not an axis"),
    ([], "nothing to sweep"),
    (["--variant", "a=--iterations 2"], "which --base sets too"),
    (["--variant", "a=--lr 1", "--grid", "lr=1,2"], "which the grid varies"),
    (["--variant", "a=--save x"], "own --save"),
    (["--variant", "a=--seed 2", "--seeds", "1"], "--seeds sets it"),
    (["--variant", "a=--method zeroshot", "--variant", "a=--method finetune"], "given twice"),
    (["--variant", "a/b=--method zeroshot"], "must be letters"),
    (["--variant", "a="], "give the flags of a"),
    (["--variant", "a=--no-such-flag"], "--variant a: unrecognized"),
    (["--grid", "variant=a,b"], "--variant NAME=FLAGS"),
    (["--variant", "zs=--method zeroshot", "--grid", "lr=1e-4"], "point variant=zs_lr=1e-4: --method zeroshot"),
])
def test_a_bad_grid_is_one_line_before_anything_runs(tmp_path, capsys, extra, expected):
    out = tmp_path / "sweep"
    assert sweep(["--base", MTIL, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not out.exists()


def test_base_commands_with_save_or_an_unknown_program_flag(tmp_path, capsys):
    assert sweep(["--base", MTIL + " --save x", "--grid", "lr=1", "--out", str(tmp_path / "o")]) == 2
    assert "--base sets --save" in capsys.readouterr().err


def test_a_sweep_runs_every_point_and_collects_one_table(tmp_path, fake, capsys):
    base, calls = fake
    out = tmp_path / "sweep"
    assert sweep(["--base", base, "--grid", "lr=0.1,0.5", "--seeds", "1,2", "--out", str(out),
                  "--select-on", "val"]) == 0
    assert [c["point"] for c in calls()] == ["lr=0.1_seed1", "lr=0.1_seed2", "lr=0.5_seed1", "lr=0.5_seed2"]
    first = calls()[0]["argv"]
    assert first[-6:] == ["--seed", "1", "--fewshot-seed", "1", "--save", str(out / "lr=0.1_seed1")]
    assert "--lr=0.1" in first  # the base command uses --shots, so the draw's seed follows the seed
    rows = read_csv(out / "results.csv")
    assert [(r["lr"], r["seed"], float(r["val"]), float(r["test"])) for r in rows] == [
        ("0.1", "1", 11.0, 91.0), ("0.1", "2", 12.0, 92.0), ("0.5", "1", 51.0, 51.0), ("0.5", "2", 52.0, 52.0)]
    summary = read_csv(out / "summary.csv")
    assert [(s["lr"], float(s["val"]), float(s["val_std"]), s["n"]) for s in summary] == [
        ("0.1", 11.5, pytest.approx(0.7071, abs=1e-4), "2"), ("0.5", 51.5, pytest.approx(0.7071, abs=1e-4), "2")]
    assert "| 0.5 | Toy | 51.50 ± 0.71 | 51.50 ± 0.71 | 2 |" in (out / "summary.md").read_text()
    selected = read_csv(out / "selected.csv")  # the best validation accuracy, although lr=0.1 tests higher
    assert [(s["lr"], float(s["test"])) for s in selected] == [("0.5", 51.5)]
    assert yaml.safe_load((out / "sweep.yaml").read_text())["grid"] == {"lr": ["0.1", "0.5"]}
    assert "Chosen on val" in capsys.readouterr().out


def test_finished_points_are_skipped_and_an_interrupted_point_runs_again(tmp_path, fake, monkeypatch, capsys):
    base, calls = fake
    argv = ["--base", base, "--grid", "lr=0.1,0.2,0.3", "--out", str(tmp_path / "sweep")]
    monkeypatch.setenv("FAKE_STOP", "lr=0.2")
    assert sweep(argv) == 3  # a stopped point: exit 3, "run again to resume"
    assert "interrupted" in capsys.readouterr().out
    assert len(calls()) == 3
    assert sweep(argv) == 0  # only the interrupted point runs again
    assert [c["point"] for c in calls()[3:]] == ["lr=0.2"]
    assert sweep(argv) == 0 and len(calls()) == 4  # all finished: nothing runs
    assert sweep([*argv, "--dry-run"]) == 0 and len(calls()) == 4
    assert capsys.readouterr().out.count("[finished]") == 3
    assert len(read_csv(tmp_path / "sweep" / "summary.csv")) == 3


def test_a_failed_point_does_not_stop_the_others_nor_enter_the_summary(tmp_path, fake, monkeypatch, capsys):
    base, calls = fake
    monkeypatch.setenv("FAKE_FAIL", "lr=0.1_seed2")
    out = tmp_path / "sweep"
    assert sweep(["--base", base, "--grid", "lr=0.1,0.5", "--seeds", "1,2", "--out", str(out),
                  "--parallel", "2"]) == 1
    assert len(calls()) == 4
    assert "FAILED (exit 1)" in capsys.readouterr().out
    statuses = {r["point"]: r["status"] for r in read_csv(out / "results.csv")}
    assert statuses["lr=0.1_seed2"] == "failed" and statuses["lr=0.5_seed2"] == "finished"
    assert [(s["lr"], s["n"]) for s in read_csv(out / "summary.csv")] == [("0.1", "1"), ("0.5", "2")]


def test_a_stop_signal_reaches_the_running_point_and_no_other_starts(tmp_path, fake, monkeypatch):
    """SLURM's SIGTERM / SIGUSR1 to the sweep: the running point gets it and exits 3, the sweep exits 3 without
    starting the next point, and running the sweep again resumes both."""
    base, calls = fake
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "mtil.sweep", "--base", base, "--grid", "lr=0.1,0.2", "--out", str(out)]
    monkeypatch.setenv("FAKE_WAIT", "1")
    sweep_process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "lr=0.1" / "waiting").exists():
        assert sweep_process.poll() is None and time.monotonic() < deadline, sweep_process.stderr.read()
        time.sleep(0.1)
    sweep_process.send_signal(signal.SIGTERM)
    assert sweep_process.wait(timeout=60) == 3
    assert [c["point"] for c in calls()] == ["lr=0.1"]
    monkeypatch.delenv("FAKE_WAIT")
    assert sweep(argv[3:]) == 0
    assert [c["point"] for c in calls()] == ["lr=0.1", "lr=0.1", "lr=0.2"]


def test_variants_are_bundles_of_flags_in_one_table_each_with_its_own_choice(tmp_path, fake, capsys):
    """--variant NAME=FLAGS is the first axis; each point adds its variant's flags; selection on val is per
    variant by default (a method is compared with its own best setting), and a grid file may name variants."""
    base, calls = fake
    out = tmp_path / "sweep"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("variant:\n  low: --lr 0.1\n  high: --lr 0.5 --shots 4\n")
    argv = ["--base", base, "--grid-file", str(grid_file), "--seeds", "1,2", "--out", str(out), "--select-on", "val"]
    assert sweep(argv) == 0
    assert [c["point"] for c in calls()] == ["variant=low_seed1", "variant=low_seed2", "variant=high_seed1",
                                             "variant=high_seed2"]
    assert calls()[2]["argv"][:6] == ["--shots", "2", "--lr", "0.5", "--shots", "4"]
    assert [(s["variant"], float(s["test"])) for s in read_csv(out / "summary.csv")] == [
        ("low", 91.5), ("high", 51.5)]
    assert [s["variant"] for s in read_csv(out / "selected.csv")] == ["low", "high"]
    assert yaml.safe_load((out / "sweep.yaml").read_text())["variants"] == {
        "low": "--lr 0.1", "high": "--lr 0.5 --shots 4"}
    capsys.readouterr()
    assert sweep([*argv, "--variant", "x=--lr 1"]) == 2  # variants from the file and the command line: one axis
    assert "names variant twice" in capsys.readouterr().err


def test_zero_shot_and_fine_tuning_share_one_mtil_sweep(tmp_path, capsys):
    """The issue's table in one command: zero-shot (which takes no training flags) beside a trained variant."""
    out = tmp_path / "sweep"
    base = f"{sys.executable} -m mtil.main --model micro-vit --device cpu --workers 0 --train-dataset ToyColorA"
    assert sweep(["--base", base, "--variant", "zeroshot=--method zeroshot",
                  "--variant", "finetune=--method finetune --iterations 2 --batch-size 4 --lr 1e-3",
                  "--grid", "shots=1", "--seeds", "1", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in read_csv(out / "results.csv")}
    assert set(rows) == {"zeroshot", "finetune"} and all(r["status"] == "finished" for r in rows.values())
    saved = yaml.safe_load((out / "variant=zeroshot_shots=1_seed1" / "config.yaml").read_text())
    assert saved["method"] == "zeroshot"
    assert yaml.safe_load((out / "variant=finetune_shots=1_seed1" / "config.yaml").read_text())["iterations"] == 2
    assert "| zeroshot | 1 | ToyColorA |" in capsys.readouterr().out


def test_selection_reads_validation_only():
    rows = [{"lr": "a", "val": 10.0, "test": 90.0}, {"lr": "b", "val": 20.0, "test": 10.0}]
    assert best(rows)["lr"] == "b"
    with pytest.raises(UserError, match="test split is refused"):
        best(rows, "test")
    with pytest.raises(UserError, match="test split is refused"):
        check_selection_split("test")


def test_seeds_runs_the_command_once_per_seed_and_writes_mean_and_std(tmp_path, capsys):
    save = tmp_path / "runs"
    argv = ["--model", "micro-vit", "--device", "cpu", "--workers", "0", "--train-dataset", "ToyColorA",
            "--shots", "1", "--iterations", "1", "--batch-size", "2", "--warmup-length", "1",
            "--max-evaluation-size", "4", "--log-every", "0", "--seeds", "1,2", "--save", str(save)]
    assert mtil_main(argv) == 0
    for seed in (1, 2):
        config = yaml.safe_load((save / f"seed{seed}" / "config.yaml").read_text())
        assert (config["seed"], config["fewshot_seed"], config["shots"]) == (seed, seed, 1)
        assert config["eval_sample_seed"] == 1  # one evaluation sample for every seed (issue 25)
    rows = read_csv(save / "seeds_results.csv")
    assert [(r["seed"], r["dataset"], r["status"]) for r in rows] == [("1", "ToyColorA", "finished"),
                                                                      ("2", "ToyColorA", "finished")]
    summary = read_csv(save / "seeds_summary.csv")
    tests = [float(r["test"]) for r in rows]
    assert summary[0]["shots"] == "1" and summary[0]["n"] == "2"
    assert float(summary[0]["test"]) == pytest.approx(sum(tests) / 2, abs=1e-3)
    assert "Mean ± std over seeds 1, 2" in capsys.readouterr().out
    assert mtil_main(argv) == 0  # again: both finished, nothing runs
    assert capsys.readouterr().out.count("finished before, skipped") == 2


def test_the_shipped_adapter_comparison_grid_plans_every_point(tmp_path, capsys):
    """configs/sweeps/few_shot_adapters.yaml: every variant's flags pass mtil's checks at every shot count."""
    grid = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "few_shot_adapters.yaml"
    base = f"{sys.executable} -m mtil.main --model toyclip --train-dataset ToyColorB --report --log-every 0"
    assert sweep(["--base", base, "--grid-file", str(grid), "--seeds", "1,2,3", "--out", str(tmp_path / "s"),
                  "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "99 points" in out and out.count("--method tip-x ") == 18 and out.count("--imo-adapter") == 27


def test_a_one_seed_row_shows_no_spread():
    from mtil.sweep.tables import markdown

    rows = [{"lr": 0.5, "dataset": "Toy", "test": 51.5, "test_std": 0.0, "n": 1},
            {"lr": 0.1, "dataset": "Toy", "test": 50.0, "test_std": 0.71, "n": 2}]
    table = markdown(rows, ["lr"])
    assert "| 0.5 | Toy | 51.50 | 1 |" in table and "| 0.1 | Toy | 50.00 ± 0.71 | 2 |" in table


def test_the_evaluation_sample_follows_eval_sample_seed_not_the_training_seed(tmp_path):
    """With --max-evaluation-size, the sample was drawn with --seed, so runs of different seeds were scored on
    different test images (zero-shot 23.4 / 28.1 / 17.2 for one model): the spread over seeds mixed two noises.
    toyclip's zero-shot row depends on the sample only: equal under one --eval-sample-seed, and --seed alone
    still draws its own sample."""
    def zero_shot(*extra: str) -> str:
        save = tmp_path / "_".join(extra)
        assert mtil_main(["--model", "toyclip", "--device", "cpu", "--workers", "0", "--eval-only",
                          "--eval-datasets", "ToyShape,ToyColor", "--max-evaluation-size", "12", *extra,
                          "--save", str(save)]) == 0
        return "".join((save / f"metrics_{name}.csv").read_text() for name in ("ToyShape", "ToyColor"))

    assert zero_shot("--seed", "1", "--eval-sample-seed", "7") == zero_shot("--seed", "2", "--eval-sample-seed", "7")
    assert zero_shot("--seed", "1") != zero_shot("--seed", "3")


def test_a_seed_sweep_keeps_one_evaluation_sample(tmp_path):
    """mtil.sweep --seeds over a command with --max-evaluation-size gives every point the first seed's sample (found
    in review: only mtil.main --seeds did); without the sample flag nothing is added."""
    from mtil.sweep.command import Planner, parse_base
    from mtil.sweep.grid import Point

    sampled = parse_base("python -m mtil.main --model micro-vit --train-dataset ToyShape --iterations 1 "
                         "--max-evaluation-size 8 --device cpu")
    planner = Planner(sampled, [], True, sample_seed=3)
    for seed in (3, 4):
        argv = planner.command(Point({}, seed), tmp_path / f"seed{seed}").argv
        assert argv[argv.index("--eval-sample-seed") + 1] == "3" and argv[argv.index("--seed") + 1] == str(seed)
    whole = parse_base("python -m mtil.main --model micro-vit --train-dataset ToyShape --iterations 1 --device cpu")
    assert "--eval-sample-seed" not in Planner(whole, [], True, sample_seed=3).command(Point({}, 4), tmp_path).argv
