"""--config files (command line > file > defaults), the config.yaml every run writes, and the rule for per-task
settings of sequences (a user's sequence file > typed flags > a named order's values > defaults)."""
from __future__ import annotations

import pytest
import yaml

from mtil.args import parse_args
from mtil.engine import tasks as task_module
from mtil.main import main
from tests.helpers import load

FAST = ["--model", "micro-vit", "--batch-size", "8", "--warmup-length", "1", "--max-evaluation-size", "16",
        "--workers", "0", "--device", "cpu"]


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("lr: 3.0e-4\nbatch-size: 16\nwe: true\navg_freq: 5\nfreeze: [visual.conv1.*, token_embedding.*]\n"
                    "train_dataset: ToyShape\n")
    config = parse_args(["--config", str(path), "--batch-size", "4"])
    assert config.lr == 3e-4 and config.we and config.avg_freq == 5  # from the file (both spellings of keys)
    assert config.freeze == ["visual.conv1.*", "token_embedding.*"]  # lists become the flag's comma list
    assert config.batch_size == 4  # the command line wins over the file
    assert config.wd == 0.0  # neither: the default
    assert set(config._file) == {"lr", "we", "avg_freq", "freeze", "train_dataset"}
    assert "batch_size" in config._cli and "lr" not in config._cli


def test_config_file_values_go_through_the_flags_checks(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("ls: 1.5\n")
    assert main(["--config", str(path), "--train-dataset", "ToyShape"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config" in err and "--ls" in err and "1.5" in err


def test_a_config_setting_the_run_does_not_use_is_a_note_not_an_error(tmp_path, capsys):
    path = tmp_path / "zscl.yaml"
    path.write_text("method: ZSCL\nref_dataset: ToyCaptions\n")
    config = parse_args(["--config", str(path), "--method", "finetune", "--train-dataset", "ToyShape"])
    assert config.method == "finetune"
    assert "ref_dataset" in capsys.readouterr().err


def test_every_run_writes_its_config_and_the_file_repeats_the_run(tmp_path, capsys):
    save = tmp_path / "run"
    argv = [*FAST, "--lr", "1e-3", "--train-dataset", "ToyShape,ToyColor", "--iterations", "2", "--we",
            "--avg-freq", "1", "--save", str(save)]
    assert main(argv) == 0
    written = yaml.safe_load((save / "config.yaml").read_text())
    assert written["lr"] == 1e-3 and written["we"] is True and written["avg_freq"] == 1
    assert written["save"] == str(save.resolve())  # paths resolved
    text = (save / "config.yaml").read_text()
    assert "#   ToyShape: lr 0.001, iterations 2" in text  # what each task trained with
    recorded = load(save / "latest.pth")["config"]
    assert all(recorded[k] == v for k, v in written.items())  # what the file says is what the run recorded
    assert "wd" not in written and "#   wd: 0.0" in text  # per-task settings not typed stay comments
    capsys.readouterr()
    # The file alone repeats the run: same settings, so the finished run is recognised (not refused).
    assert main(["--config", str(save / "config.yaml")]) == 0
    assert "already holds this finished run" in capsys.readouterr().out


@pytest.fixture
def toy_order(tmp_path, monkeypatch):
    """A named order shipped 'with mtil' whose first task has its own lr and length."""
    path = tmp_path / "toy_order.yaml"
    path.write_text("tasks:\n  - {dataset: ToyShape, lr: 5.0e-3, iterations: 3}\n  - ToyColor\n")
    monkeypatch.setitem(task_module.NAMED_ORDERS, "ToyOrder", path)
    return "ToyOrder"


def _settings(argv: list[str]) -> list:
    config = parse_args(argv)
    return [task_module.task_settings(config, spec) for spec in task_module.resolve_tasks(config)]


def test_a_named_orders_values_apply_unless_the_user_typed_the_flag(toy_order):
    untyped = _settings(["--train-dataset", toy_order, "--iterations", "2"])
    # --iterations typed: it replaces the order's per-task length; the order's lr applies (lr was not typed)
    assert [(s.lr, s.iterations) for s in untyped] == [(5e-3, 2), (1e-5, 2)]
    typed = _settings(["--train-dataset", toy_order, "--iterations", "2", "--lr", "1e-4"])
    assert [(s.lr, s.iterations) for s in typed] == [(1e-4, 2), (1e-4, 2)]
    # typed as the default value is still typed
    same_as_default = _settings(["--train-dataset", toy_order, "--iterations", "2", "--lr", "1e-5"])
    assert [s.lr for s in same_as_default] == [1e-5, 1e-5]


def test_a_config_file_counts_as_typed(toy_order, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 2.0e-4\n")
    assert [s.lr for s in _settings(["--config", str(path), "--train-dataset", toy_order, "--iterations", "2"])] \
        == [2e-4, 2e-4]


def test_a_users_sequence_file_wins_over_typed_flags(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("tasks:\n  - {dataset: ToyShape, lr: 5.0e-3, iterations: 3}\n  - ToyColor\n")
    settings = _settings(["--sequence", str(path), "--iterations", "2", "--lr", "1e-4"])
    assert [(s.lr, s.iterations) for s in settings] == [(5e-3, 3), (1e-4, 2)]


def test_a_named_order_run_is_repeated_by_its_config_file(toy_order, tmp_path, capsys):
    """Untyped per-task settings stay out of config.yaml, so the order's own values apply again (a default lr in
    the file would have replaced them), and the repeated command is recognised as the same finished run."""
    save = tmp_path / "run"
    assert main([*FAST, "--train-dataset", toy_order, "--iterations", "2", "--save", str(save)]) == 0
    applied = [t["lr"] for t in load(save / "latest.pth")["config"]["task_settings"]]
    assert applied == [5e-3, 1e-5]
    capsys.readouterr()
    assert main(["--config", str(save / "config.yaml")]) == 0
    assert "already holds this finished run" in capsys.readouterr().out


def test_resume_sees_per_task_settings(tmp_path, capsys):
    """An edited sequence file is another run, though every flag is the same."""
    sequence = tmp_path / "seq.yaml"
    sequence.write_text("tasks:\n  - ToyShape\n  - {dataset: ToyColor, lr: 1.0e-3}\n")
    argv = [*FAST, "--sequence", str(sequence), "--iterations", "2", "--save", str(tmp_path / "run")]
    assert main(argv) == 0
    sequence.write_text("tasks:\n  - ToyShape\n  - {dataset: ToyColor, lr: 0.5}\n")
    capsys.readouterr()
    assert main(argv) == 2
    assert "per-task ToyColor lr 0.001 -> 0.5" in capsys.readouterr().err


def test_the_run_prints_which_typed_flags_replaced_the_orders_values(toy_order, tmp_path, capsys):
    assert main([*FAST, "--train-dataset", toy_order, "--iterations", "2", "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "note: --lr given on the command line (or in --config) replaces ToyOrder's per-task lr (ToyShape 0.005)" \
        in out
    assert "ToyShape: lr 0.001, 2 iterations" in out and "ToyColor: lr 0.001, 2 iterations" in out


def test_the_command_line_wins_for_either_or_settings_and_switches(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_dataset: ToyShape\niterations: 4.0\nwe: true\nlora: true\nprompt: '-{}-'\n")
    config = parse_args(["--config", str(path), "--epochs", "1", "--sequence", str(path), "--no-we", "--no_lora"])
    assert config.epochs == 1 and config.iterations is None  # the typed unit replaces the file's
    assert config.sequence == str(path) and config.train_dataset is None  # typed tasks replace the file's
    assert config.we is False and config.lora is False  # a file's switch turned off on the command line
    assert parse_args(["--config", str(path)]).iterations == 4  # YAML's 4.0 for an integer flag
    assert parse_args(["--config", str(path)]).prompt == "-{}-"  # a value that starts with '-'


def test_the_shipped_clip_ast_configuration_sets_the_seeds_values():
    """configs/clip_ast_few_shot.yaml: the seed's CLIP-AST settings; the command line still wins."""
    from pathlib import Path

    from mtil.args import parse_args

    path = str(Path(__file__).resolve().parents[1] / "configs" / "clip_ast_few_shot.yaml")
    args = parse_args(["--config", path, "--train-dataset", "ToyColorB", "--shots", "2"])
    assert (args.method, args.k, args.lmbd, args.stage1_epochs, args.stage2_epochs) == ("ast", 6, [0.5, 0.5, 1.0],
                                                                                        1, 30)
    assert (args.stage2_lr, args.batch_size, args.random_selection, args.random_selection_seed) == (1e-4, 32,
                                                                                                     False, 42)
    assert parse_args(["--config", path, "--train-dataset", "ToyColorB", "--k", "3"]).k == 3
