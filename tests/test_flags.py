"""Flag roles: declared with each flag, recorded by parse_args as ``_roles``, read by the engine from there."""
from __future__ import annotations

import argparse

import pytest

from mtil.args import parse_args, setting_types
from mtil.engine import checkpoint
from mtil.engine.run import TASK_SETTING_TYPES, TASK_SETTINGS
from mtil.flags import ROLES, add_flag, flags_with_role, roles_of

ARGV = ["--train-dataset", "ToyShape", "--iterations", "1"]

# What the engine listed by name before the flags declared their roles: the declarations reproduce it.
SHAPES_OPTIMIZER = {"method", "train_mode", "freeze", "optimizer", "lr_multipliers", "lora", "lora_r",
                    "lora_target_modules", "lora_shared", "lora_shared_split_qkvo", "lr_mult_vision", "lr_mult_text",
                    "lr_mult_proj", "adapter_rank",
                    # the parameter sets of MoE-Adapters and DIKI
                    "moe_experts", "moe_routers", "moe_bottleneck", "moe_top_k", "moe_protect", "diki_depth",
                    "diki_length"}


@pytest.fixture(scope="module")
def parsed() -> argparse.Namespace:
    return parse_args(ARGV)


def test_parse_args_records_every_role_sorted(parsed):
    assert set(parsed._roles) == set(ROLES)
    assert all(dests == sorted(dests) for dests in parsed._roles.values())
    assert "_roles" not in {k for k in vars(parsed) if not k.startswith("_")}  # bookkeeping, never a setting


def test_roles_are_declared_where_the_flags_are(parsed):
    assert flags_with_role(parsed, "shapes_optimizer") == SHAPES_OPTIMIZER
    assert {"workers", "device", "save", "feature_cache"} <= flags_with_role(parsed, "operational")
    assert flags_with_role(parsed, "model") == {"model", "ref_model"}
    assert flags_with_role(parsed, "dataset") == {"train_dataset", "eval_datasets", "ref_dataset", "ref_sentences",
                                                  "moe_ddas_reference"}
    assert {"ref_model", "feature_cache", "load", "save"} <= flags_with_role(parsed, "path")  # path=True
    assert not flags_with_role(parsed, "operational") & flags_with_role(parsed, "shapes_optimizer")


def test_per_task_validators_are_the_flags_own(parsed):
    types = setting_types()
    assert TASK_SETTINGS == tuple(TASK_SETTING_TYPES)
    assert {k: types[k] for k in TASK_SETTINGS} == TASK_SETTING_TYPES


def test_flags_with_role_reads_a_mapping_or_a_namespace():
    assert flags_with_role({"operational": ["workers"]}, "operational") == {"workers"}
    assert flags_with_role({"operational": ["workers"]}, "model") == set()  # a mapping without the role: none
    hand_made = argparse.Namespace(workers=2)
    with pytest.raises(LookupError, match="_roles"):
        flags_with_role(hand_made, "operational")
    assert flags_with_role(hand_made, "operational", default=["workers"]) == {"workers"}
    with pytest.raises(ValueError, match="unknown role"):
        flags_with_role({}, "operatonal")


def test_add_flag_records_roles_and_refuses_unknown_ones():
    parser = argparse.ArgumentParser()
    add_flag(parser, "--work-dir", path=True, role="operational")
    add_flag(parser, "--rank", role={"shapes_optimizer"}, type=int)
    action = add_flag(parser, "--plain")
    assert roles_of(parser)["path"] == ["work_dir"] and roles_of(parser)["operational"] == ["work_dir"]
    assert roles_of(parser)["shapes_optimizer"] == ["rank"]
    assert action.roles == frozenset() and not action.is_path
    with pytest.raises(ValueError, match="unknown role"):
        add_flag(parser, "--other", role="operationl")


def test_checkpoint_comparison_uses_the_roles_passed(parsed, tmp_path):
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"")
    saved = {"workers": 2, "lr": 1e-5, "report_to": "none", "ref_model": str(weights)}
    now = {"workers": 8, "lr": 1e-5, "report_to": "wandb", "ref_model": str(tmp_path / "." / "teacher.pt")}
    # the declared roles: --workers and --report-to are operational, and --ref-model names the same file
    assert checkpoint.config_differences(saved, now, roles=parsed._roles) == []
    # a flag declared operational no longer counts; one not declared so does
    roles = {"operational": ["workers", "report_to"], "model": ["ref_model"]}
    assert checkpoint.config_differences(saved, now, roles=roles) == []
    assert [k for k, _, _ in checkpoint.config_differences(saved, now, roles={"model": ["ref_model"]})] == [
        "report_to", "workers"]


def test_normalize_paths_by_role(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    config = {"model": "ViT-B/16", "ref_model": str(tmp_path / "sub" / ".." / "w.pt"),
              "out": str(tmp_path / "sub" / ".."), "ref_dataset": f"ImageFolder:{tmp_path}/sub/..",
              "other": str(tmp_path / "sub" / "..")}
    roles = {"model": ["model", "ref_model"], "path": ["out"], "dataset": ["ref_dataset"]}
    out = checkpoint.normalize_paths(config, roles=roles)
    assert out["model"] == "ViT-B/16"  # a model name stays a name
    assert out["ref_model"] == str((tmp_path / "w.pt").resolve())
    assert out["out"] == str(tmp_path.resolve()) and out["ref_dataset"] == f"ImageFolder:{tmp_path.resolve()}"
    assert out["other"] == config["other"]  # no role: untouched
