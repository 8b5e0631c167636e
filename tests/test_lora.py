"""LoRA through peft (``--lora``): adapters that really act on CLIP's attention and MLP, exact merging into a plain
CLIP, shared adapters and their parameter counts, and the engine integration (task checkpoints hold a plain CLIP,
weight averaging acts on the adapters, a mid-task kill resumes exactly).

Model-level tests use ``micro-vit`` (1 layer per encoder) or ``tiny-vit`` (several layers: sharing needs them);
runs are in-process ``main([...])`` calls with a few steps on the toy datasets.
"""
from __future__ import annotations


import pytest
import torch

from mtil.datasets.toyworld import ToyTaskDataset
from mtil.main import main
from mtil.methods.weight_ensemble import WeightEnsemble
from mtil.methods.wise_merge import WiseMerge
from mtil.models import lora as L
from mtil.models.clip_loading import load_clip
from tests.helpers import load, run_killed_at

FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-2", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--batch-size-eval", "16", "--workers", "0", "--device", "cpu"]
TWO_TASKS = [*FAST, "--train-dataset", "ToyShape,ToyColor", "--iterations", "6", "--checkpoint-interval", "2",
             "--lora", "--lora-r", "4", "--lora-dropout", "0.1"]


@pytest.fixture
def small_toy_train(monkeypatch):
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 48)


def plain_model(name: str = "micro-vit"):
    return load_clip(name, seed=0).model.eval()


def encoder_sizes(model) -> list[tuple[int, int]]:
    """(width D, layers L) of each transformer encoder, read from the model itself."""
    return [(t.width, t.layers) for t in (model.visual.transformer, model.transformer)]


def perturb_all(model, std: float = 0.05, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in L.adapter_parts(model):
            part.B.copy_(torch.randn(part.B.shape, generator=generator) * std)


# ------------------------------------------------------------------------------------------------ the layers


def test_fresh_adapters_leave_outputs_unchanged(micro, outputs_of):
    before = outputs_of(micro.model)
    L.inject_lora(micro.model, L.LoraSettings(r=4, dropout=0.1))
    assert L.has_lora(micro.model) and type(micro.model).__name__ == "CLIP"
    after = outputs_of(micro.model)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.parametrize("part", ["q", "k", "v", "o"])
def test_each_attention_adapter_of_layer_0_changes_encode_image(part, micro, probe_inputs):
    """The seed's bug (an adapter on the attn.out_proj Linear, whose forward MultiheadAttention never calls) cannot
    happen: a non-zero B on any one of q, k, v, o of the image encoder's layer 0 changes the image features, and the
    forward leaves the base weights exactly as they were (same Parameter objects, same values)."""
    images, tokens = probe_inputs
    model = micro.model
    L.inject_lora(model, L.LoraSettings(r=4))
    with torch.no_grad():
        before_img, before_txt = model.encode_image(images), model.encode_text(tokens)
    base = L.base_named_parameters(model)
    values = {n: p.detach().clone() for n, p in base.items()}
    [target] = [p for p in L.adapter_parts(model)
                if p.module == "visual.transformer.resblocks.0.attn" and p.part == part]
    with torch.no_grad():
        target.B.normal_(std=0.1)
        after_img, after_txt = model.encode_image(images), model.encode_text(tokens)
    assert (after_img - before_img).abs().max() > 1e-4, f"the {part} adapter has no effect"
    assert torch.equal(after_txt, before_txt)  # the text encoder has its own adapters
    now = L.base_named_parameters(model)
    for name, param in base.items():
        assert now[name] is param and torch.equal(param, values[name]), name


def test_attention_part_targets_are_accepted_and_the_attention_pool_or_nothing_is_refused():
    """``attn.out_proj`` (the original tool's default target) is no longer refused: it selects the o part of every
    attention (an adapter on the out_proj Linear itself would do nothing, so o acts through the attention's weights).
    The ResNet attention pool's projections and names that match nothing stay refused, listing accepted names."""
    model = plain_model()
    assert L.select_targets(model, ["attn.out_proj"]) == {"visual.transformer.resblocks.0.attn": ("o",),
                                                          "transformer.resblocks.0.attn": ("o",)}
    assert L.resolve_targets(model, ["attn.out_proj"]) == ["visual.transformer.resblocks.0.attn",
                                                           "transformer.resblocks.0.attn"]
    with pytest.raises(L.UserError, match=r"available: attn \(MultiheadAttention, 2 layers\), attn.in_proj \(q, k, v "
                                          r"of MultiheadAttention, 2 layers\), attn.out_proj \(o of MultiheadAttention, "
                                          r"2 layers\), attn.q \(q of .*attn.o \(o of .*, mlp.c_fc \(Linear"):
        L.resolve_targets(model, ["nope"])
    assert L.resolve_targets(model, ["c_fc"]) == ["visual.transformer.resblocks.0.mlp.c_fc",
                                                   "transformer.resblocks.0.mlp.c_fc"]
    resnet = plain_model("tiny-rn")
    for target in ("attnpool.q_proj", "visual.attnpool.c_proj"):
        with pytest.raises(L.UserError, match="read functionally by its parent AttentionPool2d") as error:
            L.resolve_targets(resnet, [target])
        assert "\n" not in str(error.value) and "attn.out_proj (o of MultiheadAttention" in str(error.value)
    assert not any("attnpool" in name for name in L.accepted_targets(resnet))
    assert L.select_targets(resnet, ["attn.out_proj"]) == {f"transformer.resblocks.{i}.attn": ("o",)
                                                           for i in range(resnet.transformer.layers)}


def test_a_training_step_moves_only_adapters():
    model = plain_model()
    model.train()
    L.inject_lora(model, L.LoraSettings(r=4, dropout=0.1))
    base = {n: p.detach().clone() for n, p in L.base_named_parameters(model).items()}
    adapters = {n: p.detach().clone() for n, p in L.lora_parameters(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(adapters) and L.count_trainable(model) == sum(a.numel() for a in adapters.values())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 1000, (4, model.context_length), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimizer.zero_grad()
        logits, _ = model(images, tokens)
        torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
        optimizer.step()
    for name, param in L.base_named_parameters(model).items():
        assert torch.equal(param, base[name]), f"base weight {name} moved"
    moved = {n for n, p in L.lora_parameters(model).items() if not torch.equal(p, adapters[n])}
    assert moved == set(adapters)  # every adapter (A and B, q/k/v/o and MLP, both encoders) trained


def test_merged_equals_unmerged_and_is_a_plain_clip(outputs_of):
    model = plain_model()
    keys = list(model.state_dict())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    L.inject_lora(model, L.LoraSettings(r=4, dropout=0.1))
    perturb_all(model)
    unmerged = outputs_of(model)
    assert list(L.base_state_dict(model)) == keys
    L.merge_lora(model)
    merged = outputs_of(model)
    for a, b in zip(unmerged, merged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert not L.has_lora(model) and "peft_config" not in model.__dict__
    assert type(model.visual.transformer.resblocks[0].attn) is torch.nn.MultiheadAttention
    assert type(model.visual.transformer.resblocks[0].mlp.c_fc) is torch.nn.Linear
    # the merged model changed, and a second injection starts from it with outputs unchanged
    L.inject_lora(model, L.LoraSettings(r=2))
    for a, b in zip(merged, outputs_of(model)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ sharing, counts


def test_shared_adapters_are_the_same_objects():
    model = plain_model("tiny-vit")
    L.inject_lora(model, L.LoraSettings(r=4, shared=True))
    parts = L.adapter_parts(model)
    for encoder in ("image", "text"):
        attn = [p for p in parts if p.encoder == encoder and p.layer_type == "attn"]
        fc = [p for p in parts if p.encoder == encoder and p.part == "c_fc"]
        assert len({p.module for p in attn}) > 1 and len(fc) > 1
        assert all(p.A is attn[0].A and p.B is attn[0].B for p in attn)  # q, k, v, o of every layer: one pair
        assert all(p.A is fc[0].A and p.B is fc[0].B for p in fc)
        mlp_params = {id(t) for p in parts if p.encoder == encoder and p.layer_type == "mlp" for t in (p.A, p.B)}
        assert id(attn[0].A) not in mlp_params and id(attn[0].B) not in mlp_params  # attention never shares with MLP
    image_a = next(p.A for p in parts if p.encoder == "image")
    assert all(p.A is not image_a for p in parts if p.encoder == "text")  # nor do the two encoders


def test_split_qkvo_shares_by_projection():
    model = plain_model("tiny-vit")
    L.inject_lora(model, L.LoraSettings(r=4, shared=True, split_qkvo=True))
    attn = [p for p in L.adapter_parts(model) if p.encoder == "image" and p.layer_type == "attn"]
    first = {p.part: p for p in attn[:4]}
    assert list(first) == ["q", "k", "v", "o"]
    for p in attn:
        assert p.A is first[p.part].A and p.B is first[p.part].B
        for other in "qkvo":
            if other != p.part:
                assert p.A is not first[other].A and p.B is not first[other].B


def test_trainable_counts_follow_the_formulas():
    r = 4
    counts = {}
    for mode, settings in {"plain": L.LoraSettings(r=r), "shared": L.LoraSettings(r=r, shared=True),
                           "split": L.LoraSettings(r=r, shared=True, split_qkvo=True)}.items():
        model = plain_model("tiny-vit")
        sizes = encoder_sizes(model)
        L.inject_lora(model, settings)
        counts[mode] = L.count_trainable(model)
    assert all(layers > 1 for _, layers in sizes)
    assert counts["plain"] == 18 * r * sum(d * n for d, n in sizes)  # per layer q,k,v,o 2rD each, c_fc/c_proj 5rD
    assert counts["shared"] == 12 * r * sum(d for d, _ in sizes)  # per encoder: one attention pair + c_fc + c_proj
    assert counts["split"] == 18 * r * sum(d for d, _ in sizes)  # per encoder: q, k, v, o pairs + c_fc + c_proj
    assert counts["shared"] < counts["split"] < counts["plain"]
    # Only MLP targets: q/k/v/o do not exist, so split and shared coincide (and q/k/v/o never got in the key).
    model = plain_model("tiny-vit")
    L.inject_lora(model, L.LoraSettings(r=r, targets=("mlp.c_fc",), shared=True, split_qkvo=True))
    assert L.count_trainable(model) == 5 * r * sum(d for d, _ in sizes)


# ------------------------------------------------------------------------------------------------ the command line


def test_flag_errors_are_one_line(capsys, tmp_path):
    for argv, fragment in [
        ([*FAST, "--train-dataset", "ToyShape", "--iterations", "1", "--lora", "--lora-target-modules", "nope",
          "--save", str(tmp_path / "x")], "available: attn (MultiheadAttention, 2 layers)"),
        (["--lora-shared"], "give --lora too"),
        (["--lora", "--lora-shared-split-qkvo"], "--lora-shared"),
        (["--lora", "--lora-r", "0"], "--lora-r"),
        (["--lora", "--train-mode", "fc"], "nothing to adapt"),
        (["--lora", "--orthogonal-gradients", "2"], "cannot run together"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("mtil: error:") and err.strip().count("\n") == 0 and fragment in err, err
    assert not (tmp_path / "x" / "latest.pth").exists()  # refused before anything was evaluated or written


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-task --lora run (also the reference of the resume test)."""
    save = tmp_path_factory.mktemp("lora") / "run"
    assert main([*TWO_TASKS, "--save", str(save)]) == 0
    return save


def test_two_task_run_writes_plain_clip_checkpoints(reference):
    zero_shot = plain_model().state_dict()
    adapted = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    previous = zero_shot
    for name in ("ToyShape.pth", "ToyColor.pth", "latest.pth"):
        checkpoint = load(reference / name)
        assert list(checkpoint["model"]) == list(zero_shot)
        assert checkpoint["methods"]["lora"] == {"adapters": None}
        model = load_clip("micro-vit", load=str(reference / name)).model  # loadable as any checkpoint
        for key, value in model.state_dict().items():
            if key.endswith(adapted):
                assert not torch.equal(value, previous[key]), f"{name}: {key} did not learn"
            else:
                assert torch.equal(value, zero_shot[key]), f"{name}: {key} is not an adapted weight but moved"
        previous = model.state_dict() if name != "ToyColor.pth" else previous
    assert (reference / "summary.csv").is_file()


def test_killed_mid_task_resumes_exactly(reference, tmp_path, monkeypatch, capsys):
    """Killed at step 5 of task 2 (last checkpoint: step 4): latest.pth holds plain base weights plus the
    adapters in the component's state; the same command resumes and ends with the same weights."""
    save = tmp_path / "run"
    run_killed_at(monkeypatch, [*TWO_TASKS, "--save", str(save)], ["ToyShape"], 5)
    latest = load(save / "latest.pth")
    assert latest["state"]["step"] == 4 and "optimizer" in latest
    assert list(latest["model"]) == list(plain_model().state_dict())
    adapters = latest["methods"]["lora"]["adapters"]
    assert adapters and all(".lora_" in name for name in adapters)
    assert torch.equal(latest["model"]["visual.conv1.weight"], load(save / "ToyShape.pth")["model"]["visual.conv1.weight"])

    capsys.readouterr()
    assert main([*TWO_TASKS, "--save", str(save)]) == 0
    assert "resuming ToyColor at step 4/6" in capsys.readouterr().out
    for name in ("ToyShape.pth", "ToyColor.pth"):
        want, got = load(reference / name)["model"], load(save / name)["model"]
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), f"{name}: {key} differs after the resume"


def test_lora_with_lwf_runs(tmp_path, small_toy_train):
    save = tmp_path / "lwf"
    argv = [*FAST, "--train-dataset", "ToyShape", "--iterations", "3", "--method", "lwf", "--lora", "--lora-r", "2",
            "--save", str(save)]
    assert main(argv) == 0
    checkpoint = load(save / "ToyShape.pth")
    assert list(checkpoint["model"]) == list(plain_model().state_dict())
    assert list(checkpoint["methods"]["lwf"]["teacher"]) == list(plain_model().state_dict())  # a plain teacher


def test_lora_with_weight_ensembling_and_wise(tmp_path, monkeypatch, small_toy_train):
    """WE averages the adapters and loads them back *before* the merge; WiSE (start) blends merged plain weights
    with the plain task-start weights."""
    seen = {}
    we_after, wise_after, we_before = WeightEnsemble.after_task, WiseMerge.after_task, WeightEnsemble.before_task

    def we_before_task(self, run, task):
        we_before(self, run, task)
        seen["we_tracks"] = sorted(self.average)

    def we_after_task(self, run, task):
        seen["we_sees_adapters"] = L.has_lora(run.model)
        we_after(self, run, task)

    def wise_after_task(self, run, task):
        seen["wise_sees_adapters"] = L.has_lora(run.model)
        seen["wise_start_keys"] = sorted(self.start)
        wise_after(self, run, task)

    monkeypatch.setattr(WeightEnsemble, "before_task", we_before_task)
    monkeypatch.setattr(WeightEnsemble, "after_task", we_after_task)
    monkeypatch.setattr(WiseMerge, "after_task", wise_after_task)
    save = tmp_path / "we"
    argv = [*FAST, "--train-dataset", "ToyShape", "--iterations", "4", "--we", "--avg-freq", "2", "--wise-merge",
            "--wise-ref", "start", "--lora", "--lora-r", "2", "--lora-shared", "--save", str(save)]
    assert main(argv) == 0
    assert seen["we_tracks"] and all(".lora_" in n for n in seen["we_tracks"])
    assert seen["we_sees_adapters"] is True and seen["wise_sees_adapters"] is False
    assert seen["wise_start_keys"] == sorted(n for n, _ in plain_model().named_parameters())
    assert list(load(save / "ToyShape.pth")["model"]) == list(plain_model().state_dict())


def test_train_mode_image_adapts_only_the_image_encoder(tmp_path, small_toy_train):
    save = tmp_path / "image"
    argv = [*FAST, "--train-dataset", "ToyShape", "--iterations", "3", "--train-mode", "image", "--lora",
            "--lora-r", "2", "--save", str(save)]
    assert main(argv) == 0
    zero_shot = plain_model().state_dict()
    trained = load(save / "ToyShape.pth")["model"]
    changed = {k for k in zero_shot if not torch.equal(zero_shot[k], trained[k])}
    assert changed and all(k.startswith("visual.transformer.") for k in changed)


def test_the_original_default_targets_run_and_adapt_o_and_the_mlp(tmp_path, small_toy_train, capsys):
    """``--lora-target-modules attn.out_proj,mlp.c_fc,mlp.c_proj`` (the original tool's default) runs: the task
    checkpoint moved out_proj.weight and the MLP weights and left in_proj_weight (and everything else) as it was."""
    save = tmp_path / "o"
    argv = [*FAST, "--train-dataset", "ToyShape", "--iterations", "3", "--lora", "--lora-r", "2",
            "--lora-target-modules", "attn.out_proj,mlp.c_fc,mlp.c_proj", "--save", str(save)]
    assert main(argv) == 0
    sizes = encoder_sizes(plain_model())
    assert f"{12 * 2 * sum(d * n for d, n in sizes):,} trainable parameters" in capsys.readouterr().out
    zero_shot = plain_model().state_dict()
    trained = load(save / "ToyShape.pth")["model"]
    changed = {k for k in zero_shot if not torch.equal(zero_shot[k], trained[k])}
    assert changed == {k for k in zero_shot if k.endswith(("attn.out_proj.weight", "mlp.c_fc.weight",
                                                            "mlp.c_proj.weight"))}


def test_freeze_patterns_name_adapters_under_lora(tmp_path):
    """With --lora, --freeze applies to adapter names: freezing every A leaves only B to train."""
    save = tmp_path / "run"
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "2", "--lora", "--freeze", "*lora_A*",
                 "--save", str(save)]) == 0
    log = (save / "train.log").read_text()
    trainable = int(log.split("LoRA on ToyShape: ")[1].split(" trainable")[0].replace(",", ""))
    assert main([*FAST, "--train-dataset", "ToyShape", "--iterations", "2", "--lora", "--save",
                 str(tmp_path / "all")]) == 0
    everything = int((tmp_path / "all" / "train.log").read_text().split("LoRA on ToyShape: ")[1]
                     .split(" trainable")[0].replace(",", ""))
    assert 0 < trainable < everything
