"""No generated input gives a traceback: every bad command line, --config or --sequence file, damaged checkpoint or
metric file ends in a clean error (exit code 2 and one ``mtil: error:`` line, the project's UserError, or a derived
file rebuilt with a warning), never an uncaught exception.

Property-based (Hypothesis, derandomized: the same cases every run) over the targets of ``tests/fuzz_strategies.py``
(``scripts/fuzz.py`` runs the same targets with thousands of cases), a check that each property can fail, and plain
regression tests for the crashes the fuzzing found.
"""
from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtil.engine.checkpoint import load_resumable
from mtil.errors import UserError
from mtil.evaluation.matrix import matrix_from_results, read_matrix
from mtil.evaluation.metrics_io import metrics_from_results, read_metrics, read_result_records
from mtil.main import main
from mtil.models.clip_loading import load_clip, read_weights_file
from mtil.models.torchscript_weights import is_torchscript_archive
from tests import fuzz_strategies as fz
from tests.fuzz_strategies import ERROR, TARGETS, VALID, Case, Damage, run_case

FUZZ = settings(deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_no_generated_input_gives_a_traceback(target):
    @settings(FUZZ, max_examples=target.examples)
    @given(target.cases())
    def property_(case: Case) -> None:
        assert run_case(case) in (ERROR, VALID)  # anything else raises inside run_case

    property_()


# ---------------------------------------------------------------------------------------------- the checks can fail
def _files(target: str, **names: bytes) -> Case:
    return Case(target=target, files=tuple(names.items()))


VALID_RESULTS = fz.valid_metric_files()["results.jsonl"]
# A valid case of each target (accepted as it is), and a dependency deep inside what the target exercises that is
# made to raise an exception mtil does not handle: the target must then fail.
BROKEN = {
    "cli": (Case(argv=fz.BASES[1]), "mtil.args._validate", KeyError("injected")),
    "config": (Case(argv=("--config", f"{fz.CASE_DIR}/c.yaml"), files=(("c.yaml", fz.VALID_CONFIG),)),
               "mtil.yaml_files.yaml.safe_load", KeyError("injected")),
    "sequence": (Case(argv=(*fz.FAST, "--sequence", f"{fz.CASE_DIR}/s.yaml", "--iterations", "2"),
                      files=(("s.yaml", fz.VALID_SEQUENCE),)), "mtil.engine.tasks.read_yaml", KeyError("injected")),
    "resume": (Case(argv=fz.RESUME_ARGV, files=(("run/latest.pth", Damage("none")),), deep=True),
               "mtil.engine.resume.load_resumable", KeyError("injected")),
    "load": (Case(argv=fz.LOAD_ARGVS["train"], files=(("weights.pth", Damage("none")),), deep=True),
             "mtil.models.clip_loading.read_weights_file", RuntimeError("injected")),
    "metrics": (_files("metrics", **{"metrics_A.csv": fz.valid_metric_files()["metrics_A.csv"]}),
                "mtil.evaluation.metrics_io.csv.DictReader", OverflowError("injected")),
    "results": (_files("results", **{"results.jsonl": VALID_RESULTS}), "mtil.evaluation.metrics_io.json.loads",
                OverflowError("injected")),
    "matrix": (_files("matrix", **{"accuracy_matrix.csv": fz.valid_metric_files()["accuracy_matrix.csv"]}),
               "mtil.evaluation.matrix.pd.read_csv", OverflowError("injected")),
    "summarize": (Case(argv=("--summarize", fz.CASE_DIR), files=(("results.jsonl", VALID_RESULTS),), deep=True),
                  "mtil.evaluation.matrix.matrix_from_results", IndexError("injected")),
    "tensors": (Case(target="tensor:imo-adapter", files=(("imo.pt", Damage("none", source="imo-adapter")),)),
                "mtil.tensor_files._small_records_damage", KeyError("injected")),
    "paths": (Case(argv=(*fz.TRAIN_BASE, "--save", f"{fz.CASE_DIR}/run"), deep=True),
              "mtil.engine.checkpoint._absolute", KeyError("injected")),
}


def test_every_target_has_a_failing_check():
    assert set(BROKEN) == {t.name for t in TARGETS}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_target_fails_on_an_uncaught_exception(name):
    case, where, exception = BROKEN[name]
    assert run_case(case) == VALID  # the harness accepts a good input ...
    with mock.patch(where, side_effect=exception), pytest.raises(type(exception), match="injected"):
        run_case(case)  # ... and lets an unhandled exception through


@pytest.mark.parametrize("source", sorted(fz.TENSOR_FILES))
def test_bytes_changed_inside_a_tensor_record_are_always_refused(source):
    """The property the checksums exist for: whatever tensor record and bytes an in-place overwrite hits (the zip
    stays valid and torch.load reads it), mtil refuses the file; an intact copy reads back as written."""
    @settings(FUZZ, max_examples=25)
    @given(which=st.integers(0, 1000), at=st.integers(0, 2**31), noise=st.binary(min_size=1, max_size=32))
    def property_(which: int, at: int, noise: bytes) -> None:
        name = fz.TENSOR_FILES[source][1]()
        case = Case(target=f"tensor:{source}", files=((name, Damage("storage", (which, at, noise), source)),))
        assert run_case(case) == ERROR

    assert run_case(Case(target=f"tensor:{source}", files=((fz.TENSOR_FILES[source][1](),
                                                            Damage("none", source=source)),))) == VALID
    property_()


def test_a_damaged_tensor_file_read_as_intact_fails_the_target():
    """The tensor-file readers compare what they read with what was written: damage used silently is a crash."""
    case = Case(target="tensor:ogd-basis", files=(("grad_ToyShape.pth", Damage("storage", (0, 5, b"\x01"),
                                                                                 "ogd-basis")),))
    with mock.patch("mtil.tensor_files._recorded_checksums", return_value=None), \
            mock.patch("mtil.tensor_files.archive_damage", return_value=None), \
            pytest.raises(AssertionError, match="read as intact"):
        run_case(case)


def test_an_unclean_exit_fails():
    with mock.patch.object(fz, "_preflight", return_value=3), pytest.raises(fz.BadExit, match="exit code 3"):
        run_case(Case(argv=fz.BASES[1]))


def test_a_giant_model_from_a_damaged_file_fails():
    with fz.fuzz_environment(), pytest.raises(fz.HugeModel):
        from mtil.models import clip_loading
        from mtil.models.architectures import Architecture

        clip_loading.build_clip(Architecture(**{**fz.TINY_ARCH, "vocab_size": 1 << 40}))


# ---------------------------------------------------------------------------------------------- regressions
def _one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert lines[-1] == "" and len(lines) == 2 and lines[0].startswith("mtil: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


TRAIN = [*fz.FAST, "--train-dataset", "ToyShape", "--iterations", "2"]


@pytest.mark.parametrize(("text", "fragment"), [
    ("lr: 2020-13-45\n", "month must be in 1..12"),  # PyYAML builds the date: ValueError
    ("seed: 2001-02-30\n", "day is out of range"),
    ("batch_size: " + "1" * 5000 + "\n", "4300 digits"),  # int() of more than 4300 digits: ValueError
    ("[" * 3000 + "\n", "nested too deeply"),  # RecursionError
])
def test_regression_a_yaml_file_pyyaml_cannot_build_is_one_line(text, fragment, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    _one_line_error(capsys, ["--config", str(path)], "--config", "not valid YAML", fragment)
    sequence = tmp_path / "s.yaml"
    sequence.write_text("tasks:\n  - {dataset: ToyShape, lr: 2020-13-45}\n")
    _one_line_error(capsys, [*fz.FAST, "--sequence", str(sequence)], "--sequence file", "not valid YAML")


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux /proc")
def test_regression_an_unreadable_yaml_file_is_one_line(capsys):
    _one_line_error(capsys, ["--config", "/proc/self/mem"], "--config /proc/self/mem cannot be read")


def test_regression_a_sequence_task_with_a_number_as_key_is_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("tasks:\n  - {dataset: ToyShape, 1: 2, b: 3}\n")  # sorted([1, 'b']) raised TypeError
    _one_line_error(capsys, [*fz.FAST, "--sequence", str(path), "--iterations", "2"], "task 1 sets [1, 'b']")


def test_regression_a_line_break_in_a_value_stays_on_the_one_line(tmp_path, capsys):
    line = _one_line_error(capsys, ["--config", str(tmp_path / "a\nb.yaml")], "--config", "no such file")
    assert "a\\nb.yaml" in line
    _one_line_error(capsys, [*TRAIN, "--batch-size", "\t-1\n"], "--batch-size", "-1\\n")


@pytest.mark.parametrize("flags", [["--save", f"{fz.NO_USER}/run"], ["--data-location", fz.NO_USER],
                                   ["--train-dataset", f"ImageFolder:{fz.NO_USER}/x"]])
def test_regression_a_tilde_of_no_such_user_is_one_line(flags, tmp_path, capsys):
    # Path('~nouser').expanduser() raised RuntimeError while the run's settings were recorded
    _one_line_error(capsys, [*TRAIN, *flags], flags[0], "cannot expand", "no such user")
    assert not (tmp_path / "run").exists()


def test_regression_a_nul_in_a_config_path_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text('save: "run\\0x"\n')  # realpath raised ValueError: embedded null byte
    _one_line_error(capsys, [*TRAIN, "--config", str(path)], "--save", "not a usable path")


def _jsonl(tmp_path: Path, *lines: bytes) -> Path:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "results.jsonl"
    path.write_bytes(b"".join(lines) + VALID_RESULTS)
    return path


@pytest.mark.parametrize("line", [
    b"[" * 100000 + b"\n",  # json.loads: RecursionError
    b'{"after_task": 1, "dataset": "A", "iteration": 1e400, "top1": 5, "top5": 9, "sequence": ["A"]}\n',  # int(inf)
    b'{"after_task": Infinity, "dataset": "A", "top1": 1}\n',  # int(inf): OverflowError
    b'{"after_task": 99999999999999999999999, "dataset": "A", "top1": 5}\n',  # int64: OverflowError
    b'{"after_task": -1, "dataset": "A", "top1": 5}\n',  # after_task must be >= 0: ValueError
    # a whole record with a negative task: the matrix skipped it but the journal kept it as a cell, and --summarize
    # rebuilding the matrix from the journal ended in a traceback (found by the fuzzing, summarize target)
    b'{"after_task": -1, "dataset": "A", "iteration": 0, "top1": 5, "top5": 9, "sequence": []}\n',
    b'{"after_task": ' + b"1" * 5000 + b"}\n",  # json.loads: ValueError, not a JSONDecodeError
])
def test_regression_a_bad_results_line_is_skipped(line, tmp_path, capsys):
    path = _jsonl(tmp_path, line)
    assert read_result_records(path)[-6:] == read_result_records(_jsonl(tmp_path / "valid"))  # nothing lost
    assert sorted(metrics_from_results(path, "A")) == [0, 4, 8]
    (tmp_path / "metrics_A.csv").write_bytes(b"iteration,top1\nx,1\n")
    assert sorted(read_metrics(tmp_path / "metrics_A.csv")) == [0, 4, 8]  # rebuilt from results.jsonl
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        long, order = matrix_from_results(path)
    assert order == ["A", "B"] and len(long) == 6
    assert main(["--summarize", str(tmp_path)]) == 0


def test_regression_a_matrix_with_an_after_task_beyond_int64_is_damaged(tmp_path):
    path = tmp_path / "accuracy_matrix.csv"
    path.write_text("after_task,dataset,top1,top5\n99999999999999999999,A,1,2\n")
    with pytest.raises(ValueError, match="not a task number"):  # what read_or_rebuild_matrix rebuilds from
        read_matrix(path)


@pytest.mark.parametrize(("line", "fragment"), [
    (b'{"after_task": 5, "dataset": "A", "top1": 5, "sequence": ["A"]}\n', "beyond the 1 tasks"),
    (b'{"after_task": 1, "dataset": "A", "top1": 5, "sequence": ["A", "A"]}\n', "repeated datasets"),
])
def test_regression_summarize_of_a_matrix_no_sequence_has_is_one_line(line, fragment, tmp_path, capsys):
    (tmp_path / "results.jsonl").write_bytes(line)
    _one_line_error(capsys, ["--summarize", str(tmp_path)], "--summarize", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # refused before writing anything


def _checkpoint(tmp_path: Path, *edits) -> Path:
    path = tmp_path / "latest.pth"
    path.write_bytes(Damage("structure", tuple(edits)).materialize())
    return path


@pytest.mark.parametrize(("edits", "fragment"), [
    ([("delete", ("arch", "embed_dim"), None)], "recorded architecture does not match"),  # TypeError
    ([("set", ("arch",), 5)], "recorded architecture is int"),  # TypeError: 'int' is not iterable
    ([("set", ("arch",), None)], "recorded architecture is NoneType"),  # Architecture.from_dict(None) in prepare
    ([("set", ("arch", "vision_width"), ("tensor", "big"))], "recorded architecture"),  # bool(tensor)
    ([("set", ("arch", "vision_patch_size"), "G")], "recorded architecture"),  # torch.empty(size=str)
    ([("set", ("arch", "vocab_size"), 1 << 40)], "vocab_size 1099511627776"),  # a giant embedding
    ([("set", ("model", "ln_final.weight"), None)], "'ln_final.weight' is NoneType, not a tensor"),  # AttributeError
    ([("set", ("model",), [1])], "not a dict of tensors"),
    ([("set", ("config", "lr"), ("tensor", "big"))], "a valid config"),  # bool(tensor) comparing configs
    ([("set", ("config", "task_settings"), 5)], "a valid config"),  # TypeError describing the differences
    ([("set", ("config", "record_version"), {})], "a valid config"),  # TypeError in migrate_record
    ([("set", ("heads",), ("tensor", "empty"))], "a learned head cannot be read"),
    ([("set", ("heads",), {"ToyShape": "x"})], "a learned head cannot be read"),  # AttributeError in build()
    ([("set", ("state", "completed"), 5)], "completed is int"),  # len(5) once the run starts
])
def test_regression_a_damaged_checkpoint_cannot_be_resumed(edits, fragment, tmp_path):
    with pytest.raises(UserError, match="cannot resume from") as raised:
        load_resumable(_checkpoint(tmp_path, *edits))
    assert fragment in str(raised.value)


@pytest.mark.parametrize(("edits", "fragment"), [
    ([("delete", ("model",), None)], "without its model weights"),  # KeyError: 'model'
    ([("set", ("config",), 0.5)], "'config' is float"),  # chain_state: float has no .get
    ([("set", ("iteration",), "x")], "'iteration' is str"),  # int('x') in the evaluation job
    ([("set", ("state", "global_step"), "x")], "'state.global_step' is str"),
    ([("set", ("state", "completed"), None)], "'state.completed' is NoneType"),  # list(None) in the chain's state
])
def test_regression_a_damaged_load_file_is_one_line(edits, fragment, tmp_path):
    with pytest.raises(UserError, match="cannot read") as raised:
        read_weights_file(_checkpoint(tmp_path, *edits))
    assert fragment in str(raised.value)


def test_regression_a_damaged_architecture_record_builds_no_model(tmp_path):
    path = _checkpoint(tmp_path, ("set", ("arch", "vision_width"), 1 << 20))
    with fz.fuzz_environment(), pytest.raises(UserError, match="vision_width 1048576"):  # not HugeModel
        load_clip("micro-vit", load=str(path))


def test_regression_weights_of_shapes_no_clip_has_are_one_line(tmp_path):
    path = _checkpoint(tmp_path, ("delete", ("arch",), None), ("set", ("model", "visual.conv1.weight"),
                                                                 ("tensor", "empty")))
    with pytest.raises(UserError, match="a CLIP mtil can build"):  # ZeroDivisionError in CLIP's constructor
        load_clip("micro-vit", load=str(path))
    payload = torch.load(path, weights_only=True)
    payload["model"]["visual.conv1.weight"] = torch.zeros(3, 70)
    torch.save(payload, path)
    with pytest.raises(UserError, match="a CLIP mtil can build"):  # ValueError: num_heads must be greater than 0
        load_clip("micro-vit", load=str(path))


def test_regression_a_zip_with_an_undecodable_name_is_not_torchscript(tmp_path, capsys):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("w\u00e9/data.pkl", b"x")
        archive.writestr("w\u00e9/code/x", b"y")
    path = tmp_path / "weights.pth"
    path.write_bytes(buffer.getvalue().replace(b"\xc3\xa9", b"\xc3\x28"))  # UnicodeDecodeError in namelist()
    assert not is_torchscript_archive(path)
    _one_line_error(capsys, ["--eval-only", "--device", "cpu", "--load", str(path), "--eval-datasets", "ToyShape"],
                    "weights.pth is damaged: its zip records cannot be read")


def test_the_fuzzed_files_are_what_mtil_writes():
    """The fixtures the fuzzing mutates are real: mtil's writers made them and its readers accept them."""
    files = fz.valid_metric_files()
    assert [json.loads(line)["after_task"] for line in files["results.jsonl"].splitlines()] == [0, 0, 1, 1, 2, 2]
    payload = fz.base_payload()
    assert payload["format"] == "mtil-checkpoint" and {"optimizer", "scheduler", "rng"} <= set(payload)


def test_regression_a_zip_end_record_that_makes_is_zipfile_raise_is_damage():
    """zipfile.is_zipfile let BadZipFile ("zipfiles that span multiple disks are not supported") through for this
    damaged OGD basis: a traceback instead of one line."""
    damage = Damage("bytes", (("write", 2147483648, b"\x9e\xb6&\xd5"), ("append", 0, b"\xd2P"),
                              ("append", 0, b"\x9djgj\xf0u\xafyS\xc7"), ("append", 0, b"H\xde"),
                              ("append", 0, b"\xe3>\x18"), ("flip", 289, 3), ("write", 1543985, b"\xdf9"),
                              ("write", 164852, b"g\xd3")), "ogd-basis")
    assert run_case(Case(target="tensor:ogd-basis", files=(("grad_ToyShape.pth", damage),))) == ERROR
