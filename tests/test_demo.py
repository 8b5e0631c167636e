"""The demo's plumbing (jobs, sequence files, mean ± std, the checks of what the table shows) on synthetic results,
and one real property of the benchmark: a short fine-tune from ``toyclip`` learns a task far above chance."""
from __future__ import annotations

import statistics

import pandas as pd
import pytest

from mtil import demo
from mtil.benchmark_checks import chance_transfer, check_rows
from mtil.engine.tasks import read_sequence_file
from mtil.evaluation import matrix as mx
from mtil.main import main

ORDER = demo.order_of("ToyWorld")


def test_the_named_order_has_five_tasks_with_their_steps():
    specs = read_sequence_file(demo.NAMED_ORDERS["ToyWorld"], builtin=True)
    assert len(specs) >= 5 and all(spec.overrides.get("iterations") for spec in specs)


def test_plan_runs_every_method_per_seed_and_the_zero_shot_control_once(tmp_path):
    jobs = demo.plan(tmp_path, ["zeroshot", "finetune", "ZSCL"], [0, 1, 2], "ToyWorld")
    assert [(j.method, j.seed) for j in jobs] == [("zeroshot", 0)] + [(m, s) for m in ("finetune", "ZSCL")
                                                                      for s in (0, 1, 2)]
    assert len({j.save for j in jobs}) == len(jobs)
    assert all("--train-dataset" in j.argv and "ToyWorld" in j.argv for j in jobs)


def test_another_order_keeps_each_tasks_steps(tmp_path):
    reversed_order = ",".join(reversed(ORDER))
    jobs = demo.plan(tmp_path, ["finetune"], [3], reversed_order)
    path = jobs[0].argv[jobs[0].argv.index("--sequence") + 1]
    specs = read_sequence_file(path)
    named = {s.dataset: s.overrides for s in read_sequence_file(demo.NAMED_ORDERS["ToyWorld"], builtin=True)}
    assert [s.dataset for s in specs] == list(reversed(ORDER))
    assert all(s.overrides == named[s.dataset] for s in specs)


def _run(method: str, seed: int, transfer: float, last: float, diagonal: list[float]) -> demo.Job:
    job = demo.Job(method, seed, [], demo.Path("."), [100] * len(ORDER))
    wide = pd.DataFrame([[seed] * len(ORDER)], columns=ORDER, index=[1])
    job.summary = {"transfer": transfer, "avg": (transfer + last) / 2, "last": last, "diagonal": diagonal,
                   "matrix": wide}
    return job


def test_aggregate_gives_mean_and_sample_std_per_method():
    diag = [80.0] * len(ORDER)
    jobs = [_run("finetune", s, t, 70.0 + s, diag) for s, t in zip((0, 1, 2), (30.0, 32.0, 37.0))]
    row = demo.aggregate(jobs, ORDER)[0]
    assert row["transfer"] == pytest.approx(33.0)
    assert row["transfer_std"] == pytest.approx(statistics.stdev([30.0, 32.0, 37.0]))
    assert row["last"] == pytest.approx(71.0) and row["seeds"] == 3
    assert row["matrix"].iloc[0, 0] == pytest.approx(1.0)  # the mean matrix
    assert "±" in demo.format_table([row], ORDER)
    one = demo.aggregate(jobs[:1], ORDER)[0]  # one seed has no spread: the table shows no "± 0.00" (issue 25)
    assert one["seeds"] == 1 and "±" not in demo.format_table([one], ORDER)
    assert " 30.00 " in demo.format_table([one], ORDER)


def _row(method, transfer, last, std=0.5, diag=90.0):
    row = {"method": method, "transfer": transfer, "transfer_std": std, "last": last, "last_std": std,
           "avg": 0.0, "avg_std": 0.0}
    row.update({f"diag_{t}": diag for t in ORDER})
    return row


def test_checks_pass_on_the_paper_effect_and_fail_without_it():
    floor = chance_transfer(ORDER)
    good = [_row("zeroshot", 80.0, 60.0), _row("finetune", floor + 10, 85.0), _row("ZSCL", 70.0, 83.0)]
    assert all(c.passed for c in check_rows(good, ORDER))
    unlearned = [_row("finetune", floor + 10, 85.0, diag=30.0)]
    assert not check_rows(unlearned, ORDER)[0].passed
    no_forgetting = [_row("zeroshot", 80.0, 60.0), _row("finetune", 75.0, 85.0)]
    assert not check_rows(no_forgetting, ORDER)[1].passed
    keeps_more_than_half = [_row("zeroshot", 80.0, 60.0), _row("finetune", floor + 0.6 * (80.0 - floor), 85.0)]
    assert not check_rows(keeps_more_than_half, ORDER)[1].passed
    forgets_within_noise = [_row("zeroshot", 80.0, 60.0), _row("finetune", floor + 10, 85.0, std=15.0)]
    assert not check_rows(forgets_within_noise, ORDER)[1].passed
    within_noise = [_row("finetune", 40.0, 85.0, std=3.0), _row("ZSCL", 45.0, 85.0, std=3.0)]
    assert not next(c for c in check_rows(within_noise, ORDER) if "ZSCL keeps" in c.name).passed
    far_last = [_row("finetune", 40.0, 85.0), _row("ZSCL", 70.0, 70.0)]
    assert not next(c for c in check_rows(far_last, ORDER) if "Last" in c.name).passed
    higher_last = [_row("finetune", 40.0, 70.0), _row("ZSCL", 70.0, 85.0)]
    assert next(c for c in check_rows(higher_last, ORDER) if "Last" in c.name).passed


def test_a_short_fine_tune_from_toyclip_learns_position_far_above_chance(tmp_path):
    save = tmp_path / "ft"
    assert main(["--model", "toyclip", "--method", "finetune", "--train-dataset", "ToyPosition",
                 "--iterations", "400", "--batch-size", "32", "--lr", "7e-4", "--warmup-length", "10", "--seed", "0",
                 "--freeze", "token_embedding.*", "--max-evaluation-size", "500", "--workers", "0",
                 "--device", "cpu", "--save", str(save)]) == 0
    wide = mx.to_wide(mx.read_matrix(save / "accuracy_matrix.csv"), ["ToyPosition"])
    assert wide.at[0, "ToyPosition"] < 30.0  # toyclip does not know position zero-shot (5 classes: chance 20 %)
    assert wide.at[1, "ToyPosition"] >= 20.0 + 30.0


def test_quick_runs_the_effect_on_one_seed_and_skips_the_seed_checks(tmp_path, monkeypatch, capsys):
    """make demo (--quick): zero-shot, fine-tuning and ZSCL on one seed, the newcomer's first few minutes; the
    checks compare gaps with the spread over seeds, so one seed says where the checked table is instead."""
    seen = {}

    def fake_experiment(out, methods, seeds, order, parallel):
        seen.update(methods=methods, seeds=seeds)
        rows = [_row("zeroshot", 60.0, 30.0), _row("finetune", 30.0, 90.0), _row("ZSCL", 55.0, 88.0)]
        for row in rows:
            row["seeds"] = 1
        return rows, ORDER

    monkeypatch.setattr(demo, "experiment", fake_experiment)
    monkeypatch.setattr(demo, "write_outputs", lambda out, rows, tasks: None)
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    assert seen == {"methods": list(demo.QUICK_METHODS), "seeds": list(demo.QUICK_SEEDS)}
    out = capsys.readouterr().out
    assert "make demo-full" in out and "[PASS]" not in out and "[FAIL]" not in out
    assert demo.main(["--quick", "--seeds", "1,2"]) == 2
