"""LoRA on parts of CLIP's attention: ``attn.out_proj`` (the original tool's default target, o only),
``attn.in_proj`` (q, k, v), ``attn.q`` / ``attn.k`` / ``attn.v`` / ``attn.o`` and unions of them.

A part that is not selected has no parameter at all and leaves its weights bitwise untouched, through training
and the merge. Model-level only (``micro-vit``: 1 layer per encoder, ``tiny-vit``: several, for sharing).
"""
from __future__ import annotations

import pytest
import torch

from mtil.models import lora as L
from mtil.models.clip_loading import load_clip

ORIGINAL_DEFAULT = ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")
ATTENTIONS = ("visual.transformer.resblocks.0.attn", "transformer.resblocks.0.attn")  # micro-vit's two


def plain_model(name: str = "micro-vit"):
    return load_clip(name, seed=0).model.eval()


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike torch.equal, tells -0.0 from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in L.base_state_dict(model).items()}


def lora_names_under(model, module: str) -> list[str]:
    return [n for n in L.lora_parameter_names(model) if n.startswith(module + ".")]


def train(model, inputs, steps: int = 3) -> None:
    """A few AdamW steps on a contrastive loss, adapters only."""
    images, tokens = inputs
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(L.is_lora_name(n) for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        logits, _ = model(images, tokens)
        torch.nn.functional.cross_entropy(logits, torch.arange(len(images))).backward()
        optimizer.step()


def changed_weights(before: dict, after: dict) -> dict[str, set[str]]:
    """Per base key that changed: for in_proj_weight the thirds (q, k, v) that changed, else {"all"}."""
    assert list(before) == list(after)
    changed = {}
    for key, old in before.items():
        new = after[key]
        if key.endswith("attn.in_proj_weight"):
            thirds = {p for p, a, b in zip("qkv", old.chunk(3), new.chunk(3)) if not bitwise_equal(a, b)}
            if thirds:
                changed[key] = thirds
        elif not bitwise_equal(old, new):
            changed[key] = {"all"}
    return changed


def expected_changes(parts: str) -> dict[str, set[str]]:
    """What training + merging adapters on ``parts`` of both micro-vit attentions (and no MLP) may change."""
    want = {}
    for attn in ATTENTIONS:
        if set(parts) & set("qkv"):
            want[f"{attn}.in_proj_weight"] = set(parts) & set("qkv")
        if "o" in parts:
            want[f"{attn}.out_proj.weight"] = {"all"}
    return want


# ------------------------------------------------------------------------------------------------ selection


def test_in_proj_is_q_k_v_and_targets_combine_by_union():
    model = plain_model()

    def parts(*targets):
        selection = L.select_targets(model, targets)
        assert list(selection) == list(ATTENTIONS)
        return [selection[a] for a in ATTENTIONS]

    qkv, qkvo = [("q", "k", "v")] * 2, [("q", "k", "v", "o")] * 2
    assert parts("attn.in_proj") == parts("attn.in_proj_weight") == parts("attn.q", "attn.k", "attn.v") == qkv
    assert parts("attn") == parts("attn.in_proj", "attn.out_proj") == parts("attn.o", "attn", "attn.q") == qkvo
    assert parts("attn.out_proj") == parts("attn.o") == [("o",)] * 2
    assert parts("attn.v", "attn.q") == [("q", "v")] * 2  # always in q, k, v, o order
    assert parts("attn.k", "attn.k") == [("k",)] * 2
    # a longer prefix narrows the layers; the union is per attention module
    assert parts("visual.transformer.resblocks.0.attn.o", "attn.q") == [("q", "o"), ("q",)]
    assert L.select_targets(model, ["visual.transformer.resblocks.0.attn.in_proj"]) == {ATTENTIONS[0]: ("q", "k", "v")}
    # the MLP targets are unchanged (None: a Linear)
    assert L.select_targets(model, ORIGINAL_DEFAULT) == {
        ATTENTIONS[0]: ("o",), ATTENTIONS[1]: ("o",),
        **{f"{enc}transformer.resblocks.0.mlp.{m}": None for m in ("c_fc", "c_proj") for enc in ("visual.", "")}}
    for bad in ("attn.qk", "attn.out", "mlp.q", "attn.in_proj.q"):
        with pytest.raises(L.UserError, match=r"matches no layer LoRA can adapt; available: attn \("):
            L.select_targets(model, [bad])


def test_accepted_targets_list_the_part_names():
    accepted = L.accepted_targets(plain_model())
    assert list(accepted) == ["attn", "attn.in_proj", "attn.out_proj", "attn.q", "attn.k", "attn.v", "attn.o",
                              "mlp.c_fc", "mlp.c_proj"]
    assert accepted["attn.out_proj"] == "o of MultiheadAttention, 2 layers"
    assert accepted["attn.in_proj"] == "q, k, v of MultiheadAttention, 2 layers"


def test_list_clip_layers_shows_the_part_names(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "list_clip_layers.py"
    spec = importlib.util.spec_from_file_location("list_clip_layers", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--model", "micro-vit", "--linear-only"]) == 0
    out = capsys.readouterr().out
    assert "attn.out_proj (o of MultiheadAttention, 2 layers)" in out and "attn.q (q of MultiheadAttention" in out
    assert "adapted as part o of its attention" in out
    assert "# refused" not in out  # micro-vit has no attention pool: nothing is refused


# ------------------------------------------------------------------------------------------------ injection


@pytest.mark.parametrize("targets", [("attn.q",), ("attn.k", "attn.o"), ("attn.in_proj",), ORIGINAL_DEFAULT,
                                     ("attn.v", "mlp.c_proj"), ("attn.o",)])
def test_fresh_adapters_on_any_part_set_leave_outputs_exactly_unchanged(targets, micro, outputs_of):
    before = outputs_of(micro.model)
    L.inject_lora(micro.model, L.LoraSettings(r=4, dropout=0.1, targets=targets))
    for a, b in zip(before, outputs_of(micro.model)):
        assert torch.equal(a, b)


def test_unselected_parts_have_no_parameters():
    model = plain_model()
    L.inject_lora(model, L.LoraSettings(r=4, targets=("attn.q", "attn.v")))
    for attn in ATTENTIONS:
        module = model.get_submodule(attn)
        assert module.adapted_parts(L.ADAPTER) == ("q", "v")
        assert sorted(lora_names_under(model, attn)) == [f"{attn}.lora_{h}.default.{p}" for h in "AB" for p in "qv"]
        assert type(module.get_base_layer().out_proj) is type(plain_model().visual.transformer.resblocks[0].attn
                                                               .out_proj)  # o: the plain Linear, no LoRA layer
        assert not module.get_base_layer().in_proj_weight.requires_grad
    assert [(p.module, p.part) for p in L.adapter_parts(model)] == [(a, p) for a in ATTENTIONS for p in "qv"]
    assert L.count_trainable(model) == sum(p.A.numel() + p.B.numel() for p in L.adapter_parts(model))


def test_in_proj_and_q_k_v_targets_give_the_same_adapters():
    adapters = []
    for targets in (("attn.in_proj",), ("attn.q", "attn.k", "attn.v"), ("attn.in_proj_weight",)):
        model = plain_model()
        L.inject_lora(model, L.LoraSettings(r=4, targets=targets), seed=3)
        adapters.append(L.lora_parameters(model))
    assert list(adapters[0]) == list(adapters[1]) == list(adapters[2])
    assert all(".out_proj." not in name for name in adapters[0])
    for name in adapters[0]:
        assert torch.equal(adapters[0][name], adapters[1][name]) and torch.equal(adapters[0][name], adapters[2][name])


def test_the_original_default_adapts_o_and_the_mlp_only(micro, probe_inputs, outputs_of):
    """``attn.out_proj,mlp.c_fc,mlp.c_proj``: accepted; the o adapter changes the outputs; q, k, v have no LoRA
    parameters; training + merging changes ``out_proj.weight`` and the MLP weights and leaves ``in_proj_weight``
    (and every other weight) bitwise unchanged."""
    model = micro.model
    images, tokens = probe_inputs
    before = snapshot(model)
    L.inject_lora(model, L.LoraSettings(r=4, targets=ORIGINAL_DEFAULT))
    for attn in ATTENTIONS:
        assert model.get_submodule(attn).adapted_parts(L.ADAPTER) == ("o",)
        assert sorted(lora_names_under(model, attn)) == [f"{attn}.base_layer.out_proj.lora_{h}.default.weight"
                                                         for h in "AB"]
    assert {p.part for p in L.adapter_parts(model)} == {"o", "c_fc", "c_proj"}
    widths = [model.visual.transformer.width, model.transformer.width]
    assert L.count_trainable(model) == sum(12 * 4 * d for d in widths)  # 12 r D per layer, one layer per encoder

    # a non-zero o adapter of the image encoder changes the image features only, and the forward leaves the base
    # weights exactly as they were (same Parameter objects, same values)
    with torch.no_grad():
        fresh_img, fresh_txt = model.encode_image(images), model.encode_text(tokens)
    base = L.base_named_parameters(model)
    [o_image] = [p for p in L.adapter_parts(model) if p.module == ATTENTIONS[0] and p.part == "o"]
    with torch.no_grad():
        o_image.B.normal_(std=0.1)
        img, txt = model.encode_image(images), model.encode_text(tokens)
        o_image.B.zero_()
    assert (img - fresh_img).abs().max() > 1e-4 and torch.equal(txt, fresh_txt)
    now = L.base_named_parameters(model)
    assert all(now[n] is p and bitwise_equal(p, before[n]) for n, p in base.items())

    train(model, probe_inputs)
    trained = outputs_of(model)
    L.merge_lora(model)
    merged = outputs_of(model)
    for a, b in zip(trained, merged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    changed = changed_weights(before, snapshot(model))
    mlp = {f"{enc}transformer.resblocks.0.mlp.{m}.weight": {"all"} for enc in ("visual.", "") for m in ("c_fc",
                                                                                                         "c_proj")}
    assert changed == {**expected_changes("o"), **mlp}  # in_proj_weight, biases, everything else: bitwise unchanged


@pytest.mark.parametrize("targets, parts", [(("attn.q",), "q"), (("attn.k", "attn.v"), "kv"),
                                            (("attn.out_proj",), "o"), (("attn.in_proj",), "qkv"),
                                            (("attn.v", "attn.o"), "vo")])
def test_training_and_merging_changes_exactly_the_selected_parts(targets, parts, micro, probe_inputs, outputs_of):
    """``attn.q`` alone: only rows 0..D-1 of in_proj_weight change; the k and v rows, out_proj and everything else
    stay bitwise unchanged (likewise for other part sets)."""
    model = micro.model
    before = snapshot(model)
    L.inject_lora(model, L.LoraSettings(r=4, targets=targets))
    assert {p.part for p in L.adapter_parts(model)} == set(parts)
    train(model, probe_inputs)
    moved = [p for p in L.adapter_parts(model) if not torch.equal(p.B, torch.zeros_like(p.B))]
    assert len(moved) == len(L.adapter_parts(model))  # every selected part trained
    trained = outputs_of(model)
    L.merge_lora(model)
    for a, b in zip(trained, outputs_of(model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert changed_weights(before, snapshot(model)) == expected_changes(parts)
    assert not L.has_lora(model) and list(model.state_dict()) == list(before)
    assert type(model.visual.transformer.resblocks[0].attn) is torch.nn.MultiheadAttention


def test_merged_equals_unmerged_for_a_part_subset(outputs_of):
    model = plain_model()
    keys = list(model.state_dict())
    L.inject_lora(model, L.LoraSettings(r=4, targets=("attn.q", "attn.o", "mlp.c_proj")))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in L.adapter_parts(model):
            part.B.copy_(torch.randn(part.B.shape, generator=generator) * 0.05)
    unmerged = outputs_of(model)
    L.merge_lora(model)
    for a, b in zip(unmerged, outputs_of(model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys and "peft_config" not in model.__dict__
    assert type(model.transformer.resblocks[0].attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"


# ------------------------------------------------------------------------------------------------ sharing, counts


@pytest.mark.parametrize("targets, a, m", [(ORIGINAL_DEFAULT, 1, 2), (("attn.q", "attn.v"), 2, 0),
                                           (("attn.in_proj", "mlp.c_fc"), 3, 1), (("attn.k",), 1, 0)])
def test_trainable_counts_follow_the_formulas_for_part_subsets(targets, a, m):
    """a attention parts (2 r D each) and m MLP linears (5 r D each) per layer: plain (2a + 5m) r sum(D L), shared
    (2 [a > 0] + 5m) r sum(D), shared + split (2a + 5m) r sum(D)."""
    r = 4
    counts = {}
    for mode, settings in {"plain": L.LoraSettings(r=r, targets=targets),
                           "shared": L.LoraSettings(r=r, targets=targets, shared=True),
                           "split": L.LoraSettings(r=r, targets=targets, shared=True, split_qkvo=True)}.items():
        model = plain_model("tiny-vit")
        sizes = [(t.width, t.layers) for t in (model.visual.transformer, model.transformer)]
        L.inject_lora(model, settings)
        counts[mode] = L.count_trainable(model)
        if mode == "split":
            attn = [p for p in L.adapter_parts(model) if p.encoder == "text" and p.layer_type == "attn"]
            first = {}
            for p in attn:
                owner = first.setdefault(p.part, p)
                assert p.A is owner.A and p.B is owner.B
            assert len({id(p.A) for p in first.values()}) == a
    assert all(layers > 1 for _, layers in sizes)
    assert counts["plain"] == (2 * a + 5 * m) * r * sum(d * n for d, n in sizes)
    assert counts["shared"] == (2 * (a > 0) + 5 * m) * r * sum(d for d, _ in sizes)
    assert counts["split"] == (2 * a + 5 * m) * r * sum(d for d, _ in sizes)


def test_shared_o_adapters_train_and_merge():
    """``attn.out_proj`` with --lora-shared: one o pair per encoder, used by every layer, merged into every
    out_proj.weight; in_proj_weight stays bitwise unchanged."""
    model = plain_model("tiny-vit")
    before = snapshot(model)
    L.inject_lora(model, L.LoraSettings(r=4, targets=("attn.out_proj",), shared=True))
    parts = L.adapter_parts(model)
    for encoder in ("image", "text"):
        mine = [p for p in parts if p.encoder == encoder]
        assert {p.part for p in mine} == {"o"} and len(mine) > 1
        assert all(p.A is mine[0].A and p.B is mine[0].B for p in mine)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, model.visual.input_resolution, model.visual.input_resolution, generator=generator)
    tokens = torch.randint(1, 400, (2, model.context_length), generator=generator)
    train(model, (images, tokens), steps=2)
    L.merge_lora(model)
    changed = changed_weights(before, snapshot(model))
    assert set(changed) == {k for k in before if k.endswith("attn.out_proj.weight")}
