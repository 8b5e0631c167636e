"""--method moe-adapters: the experts change nothing until trained (either back-end), the gates, which parameters
receive gradients, earlier tasks' predictions under later training, DDAS's choices, exact resume, --label-space
seen with one task, the trainable-parameter count, and the refusals."""
from __future__ import annotations

import json
import re

import pytest
import torch

from mtil.datasets.toyworld import ToyTaskDataset
from mtil.engine.sequence import SequenceRunner
from mtil.main import main
from mtil.methods.moe_adapters import MoEAdaptersMethod
from mtil.models.clip_loading import load_clip
from mtil.models.moe_adapter import (
    MoEAdapters,
    MoELayer,
    MoERoutedHead,
    TaskSelector,
    expert_parameters,
    fit_autoencoder,
    moe_parameter_count,
    selector_input,
)
from mtil.models.text import tokenize
from mtil.models.transforms import eval_transform
from mtil.models.backend import encode_text, image_spec
from tests.helpers import load, run_killed_at

OPEN_TOYCLIP = "open_clip:mtil-tiny-vit/toyclip"
EXPERTS = 6
# micro-vit (one block per encoder), few experts so that protection matters, tiny DDAS
FAST = ["--model", "micro-vit", "--method", "moe-adapters", "--batch-size", "8", "--warmup-length", "1",
        "--max-evaluation-size", "16", "--batch-size-eval", "16", "--workers", "0", "--device", "cpu",
        "--moe-experts", str(EXPERTS), "--moe-routers", "2", "--moe-lr", "5e-2", "--moe-ddas-images", "32",
        "--moe-ddas-steps", "40"]
TASKS = ["ToyShape", "ToyColor"]
TWO_TASKS = [*FAST, "--train-dataset", ",".join(TASKS), "--iterations", "6", "--checkpoint-interval", "2"]


@pytest.fixture
def small_toy(monkeypatch):
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "train", 32)
    monkeypatch.setitem(ToyTaskDataset.default_sizes, "test", 16)


def perturb(moe: MoEAdapters, seed: int = 0, std: float = 0.5) -> None:
    """Non-zero up-projections and routers everywhere (trained-looking experts)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, layer in moe.all_layers():
            for expert in layer.experts:
                expert.up.weight.copy_(torch.randn(expert.up.weight.shape, generator=generator) * std)
                expert.up.bias.copy_(torch.randn(expert.up.bias.shape, generator=generator) * std)
            for gate in layer.gates:
                gate.copy_(torch.randn(gate.shape, generator=generator))


def probe(model, n: int = 3):
    generator = torch.Generator().manual_seed(1234)
    resolution = image_spec(model).resolution
    images = torch.randn(n, 3, resolution, resolution, generator=generator)
    tokens = tokenize(model, ["a photo of a dog.", "a red square", "zzz"][:n])
    return images, tokens


def outputs(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), encode_text(model, tokens)


# ------------------------------------------------------------------------------------------ the model parts


@pytest.mark.parametrize("name", ["toyclip", OPEN_TOYCLIP])
def test_fresh_adapters_change_no_output(name):
    model = load_clip(name).model.eval()
    images, tokens = probe(model)
    plain = outputs(model, images, tokens)
    moe = MoEAdapters.for_model(model, experts=5, routers=3, top_k=2, seed=0)
    moe.attach(model)
    with torch.no_grad():
        for _, _, layer in moe.all_layers():  # routers that choose: the experts really run
            for gate in layer.gates:
                gate.normal_()
    for routes in (0, 2, torch.tensor([0, 1, -1])):
        with moe.routed(image=routes, text=routes):
            got = outputs(model, images, tokens)
        assert all(torch.equal(a, b) for a, b in zip(plain, got)), f"routes {routes} changed CLIP's outputs"
    perturb(moe)  # the same with trained experts does change them (the check above can fail)
    with moe.routed(image=0, text=0):
        moved = outputs(model, images, tokens)
    assert not torch.allclose(plain[0], moved[0]) and not torch.allclose(plain[1], moved[1])
    with moe.routed():  # no route: exactly CLIP again
        assert all(torch.equal(a, b) for a, b in zip(plain, outputs(model, images, tokens)))
    moe.detach()
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs(model, images, tokens)))


def test_both_backends_agree_with_trained_experts():
    """The same experts in toyclip through clip-anytorch ((L, N, D) blocks) and open_clip (batch-first blocks) give
    the same features: the layout is read right, and the router reads each sample's first token."""
    models = [load_clip(name).model.eval() for name in ("toyclip", OPEN_TOYCLIP)]
    images, tokens = probe(models[0])
    moes = [MoEAdapters.for_model(m, experts=5, routers=2, top_k=2, seed=0) for m in models]
    perturb(moes[0])
    moes[1].load_state_dict(moes[0].state_dict())
    features = []
    for model, moe in zip(models, moes):
        moe.attach(model)
        with moe.routed(image=torch.tensor([1, 0, -1]), text=1):
            features.append(outputs(model, images, tokens))
    for a, b in zip(*features):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_gate_weights_sum_to_one_over_exactly_k_experts():
    layer = MoELayer(width=16, experts=7, routers=3, top_k=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate, noise in zip(layer.gates, layer.noises):
            gate.copy_(torch.randn(gate.shape, generator=generator))
            noise.copy_(torch.randn(noise.shape, generator=generator))
    first = torch.randn(50, 16, generator=generator)
    routes = torch.randint(-1, 3, (50,), generator=generator)
    for training in (False, True):
        weights = layer.gate_weights(first, routes, training)
        routed = routes >= 0
        assert torch.allclose(weights[routed].sum(dim=1), torch.ones(int(routed.sum())))
        assert ((weights[routed] > 0).sum(dim=1) == 2).all()
        assert (weights[~routed] == 0).all()
    clean = layer.gate_weights(first, 1, training=False)
    assert torch.equal(clean, layer.gate_weights(first, 1, training=False))  # no noise at test
    # by hand: the softmax of the two largest clean logits of router 1
    logits = first @ layer.gates[1]
    top = logits.topk(2, dim=1)
    expected = torch.zeros(50, 7).scatter(1, top.indices, torch.softmax(top.values, dim=1))
    assert torch.allclose(clean, expected)
    layer.allowed[1] = torch.tensor([True, False, True, False, True, False, False])  # a protected router
    masked = layer.gate_weights(first, 1, training=True)
    assert (masked[:, ~layer.allowed[1]] == 0).all() and ((masked > 0).sum(dim=1) == 2).all()


# ------------------------------------------------------------------------------------------ DDAS


def _background_features(model, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """toyclip's features of ToyBackground images and their background (dark, light, grassy, wooden): ToyWorld
    images that differ by construction."""
    data = ToyTaskDataset("ToyBackground", split=split, seed=0, size=n)
    transform = eval_transform(image_spec(model))
    items = [data[i] for i in range(len(data))]
    images = torch.stack([transform(image) for image, _ in items])
    with torch.no_grad():
        return model.encode_image(images).float(), torch.tensor([label for _, label in items])


def test_ddas_routes_trained_tasks_home_and_an_untrained_one_to_zero_shot():
    model = load_clip("toyclip").model.eval()
    train, train_labels = _background_features(model, "train", 240)
    test, test_labels = _background_features(model, "test", 160)
    selector = TaskSelector()
    for slot, background in enumerate((0, 1)):  # task 0: dark backgrounds, task 1: light ones
        ae, threshold, record = fit_autoencoder(selector_input(train[train_labels == background]), hidden=16,
                                                steps=300, seed=slot)
        assert record["held_out"] > 0 and threshold > 0
        selector.add(ae, threshold)
    routes = selector.route(test)
    for background, want in ((0, 0), (1, 1), (2, -1), (3, -1)):  # grassy and wooden: never trained
        share = (routes[test_labels == background] == want).float().mean().item()
        assert share >= 0.85, f"background {background}: {share:.2f} routed to {want}"
    # the official rule: raw errors against one absolute threshold (huge: nothing goes to zero-shot)
    absolute = TaskSelector(absolute=1e6)
    for ae, threshold in zip(selector.autoencoders, selector.thresholds):
        absolute.add(ae, threshold)
    assert (absolute.route(test) >= 0).all()
    # a reference autoencoder on wooden backgrounds wins on them: zero-shot
    ae, threshold, _ = fit_autoencoder(selector_input(train[train_labels == 3]), hidden=16, steps=300, seed=9)
    absolute.set_reference(ae, threshold)
    assert (absolute.route(test[test_labels == 3]) == -1).float().mean() >= 0.85


# ------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The straight two-task run, watched: the gradients of task 2's first step, every routed head's logits, and
    the method itself."""
    save = tmp_path_factory.mktemp("moe") / "straight"
    seen: dict = {"grads": None, "calls": [], "method": None}
    original_backward, original_forward = MoEAdaptersMethod.after_backward, MoERoutedHead.forward

    def after_backward(self, run):
        seen["method"] = self
        if run.state.completed == TASKS[:1] and seen["grads"] is None:
            seen["grads"] = {n: (p.grad is not None and bool(p.grad.abs().sum() > 0), p.grad is not None)
                             for n, p in self.moe.named_parameters()}
            seen["frozen"] = {(e, i): layer.frozen.clone() for e, i, layer in self.moe.all_layers()}
        original_backward(self, run)

    def forward(self, features):
        logits = original_forward(self, features)
        seen["calls"].append((list(self.datasets), features.clone(), logits.clone()))
        return logits

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ToyTaskDataset.default_sizes, "train", 32)
        patch.setitem(ToyTaskDataset.default_sizes, "test", 16)
        patch.setattr(MoEAdaptersMethod, "after_backward", after_backward)
        patch.setattr(MoERoutedHead, "forward", forward)
        assert main([*TWO_TASKS, "--save", str(save)]) == 0
    seen["save"] = save
    return seen


def test_only_the_current_router_and_unprotected_experts_get_gradients(reference):
    grads, frozen = reference["grads"], reference["frozen"]
    assert grads is not None
    locked = [(e, i, k) for (e, i), mask in frozen.items() for k in range(EXPERTS) if mask[k]]
    assert locked, "task 1 froze no expert: nothing to check"
    for name, (nonzero, present) in grads.items():
        encoder, index, kind, number = re.match(r"(image|text)\.(\d+)\.(experts|gates|noises)\.(\d+)", name).groups()
        if kind == "experts":
            if frozen[(encoder, int(index))][int(number)]:
                assert not present, f"{name}: a protected expert received a gradient"
        elif int(number) != 1:
            assert not present, f"{name}: router 1 (task 1's) received a gradient in task 2"
    assert grads["image.0.gates.1"][0] and grads["text.0.gates.1"][0], "the current router received no gradient"
    unlocked = [n for n, (nonzero, _) in grads.items() if ".experts." in n and nonzero]
    assert unlocked, "no unprotected expert received a gradient"


def test_earlier_tasks_predictions_unchanged_when_routed_to_their_router(reference):
    calls = [(features, logits) for datasets, features, logits in reference["calls"] if datasets == TASKS[:1]]
    assert len(calls) == 2  # ToyShape's test images after task 1 and after task 2
    (before, logits_before), (after, logits_after) = calls
    home = (before[:, -1] == 0) & (after[:, -1] == 0)  # DDAS sends them to router 0 both times
    assert home.any(), "no image of task 1 was routed to its router"
    # the same up to float rounding: the other images of a batch differ between the rows, and a matrix product's
    # last bits depend on the batch's size
    assert torch.allclose(before[home], after[home], rtol=0, atol=1e-6)
    assert torch.allclose(logits_before[home], logits_after[home], rtol=0, atol=1e-6)
    assert torch.equal(logits_before[home].argmax(1), logits_after[home].argmax(1))
    # later training did move the adapters (so the equality above is not trivial)
    first, second = (load(reference["save"] / f"{t}.pth")["methods"]["moe-adapters"]["moe"] for t in TASKS)
    assert any(not torch.equal(first[k], second[k]) for k in first if ".experts." in k)


def test_trainable_parameters_printed_match_a_count_by_hand(reference):
    log = (reference["save"] / "train.log").read_text()
    printed = [int(n.replace(",", "")) for n in re.findall(r"\): ([\d,]+) trainable parameters", log)]
    assert len(printed) == 2
    width, bottleneck = 64, 64  # micro-vit: one block of width 64 per encoder
    expert = 2 * width * bottleneck + bottleneck + width
    router = 2 * width * EXPERTS  # the task's router and its noise matrix
    assert printed[0] == 2 * (EXPERTS * expert + router) == moe_parameter_count(
        {"image": [64], "text": [64]}, EXPERTS)
    frozen = load(reference["save"] / "ToyShape.pth")["methods"]["moe-adapters"]["moe"]
    locked = int(frozen["image.0.frozen"].sum()) + int(frozen["text.0.frozen"].sum())
    assert locked > 0 and printed[1] == 2 * (EXPERTS * expert + router) - locked * expert
    assert expert == expert_parameters(width)


def _checkpoint_equal(want: dict, got: dict, where: str) -> None:
    assert want["model"].keys() == got["model"].keys()
    for key in want["model"]:
        assert torch.equal(want["model"][key], got["model"][key]), f"{where}: model {key} differs"
    a, b = want["methods"]["moe-adapters"], got["methods"]["moe-adapters"]
    assert a["moe"].keys() == b["moe"].keys() and a["trained"] == b["trained"]
    for key in a["moe"]:
        assert torch.equal(a["moe"][key], b["moe"][key]), f"{where}: {key} differs"
    for x, y in zip(a["selector"]["autoencoders"], b["selector"]["autoencoders"]):
        assert all(torch.equal(x[k], y[k]) for k in x), f"{where}: a DDAS autoencoder differs"
    assert a["selector"]["thresholds"] == b["selector"]["thresholds"]


def test_killed_mid_task_resumes_exactly(reference, tmp_path, monkeypatch, small_toy, capsys):
    save = tmp_path / "killed"
    run_killed_at(monkeypatch, [*TWO_TASKS, "--save", str(save)], TASKS[:1], 5, method=MoEAdaptersMethod)
    latest = load(save / "latest.pth")
    assert latest["state"]["step"] == 4 and "optimizer" in latest
    assert not any("experts" in k for k in latest["model"])  # CLIP's own names only
    capsys.readouterr()
    assert main([*TWO_TASKS, "--save", str(save)]) == 0
    assert "resuming ToyColor at step 4/6" in capsys.readouterr().out
    for task in TASKS:
        _checkpoint_equal(load(reference["save"] / f"{task}.pth"), load(save / f"{task}.pth"), task)
    assert (reference["save"] / "accuracy_matrix.csv").read_text() == (save / "accuracy_matrix.csv").read_text()


def test_killed_at_a_task_boundary_resumes_exactly(reference, tmp_path, monkeypatch, small_toy):
    """Killed after task 1's checkpoint, before its evaluation: the resumed run evaluates first, through heads
    restored from the checkpoint and the method's restored state, before any hook has run."""
    save = tmp_path / "boundary"
    original = SequenceRunner.evaluate_row

    def evaluate_then_die(self, run, after_task):
        if after_task == 1:
            raise SystemExit(137)
        return original(self, run, after_task)

    with monkeypatch.context() as patch:
        patch.setattr(SequenceRunner, "evaluate_row", evaluate_then_die)
        with pytest.raises(SystemExit):
            main([*TWO_TASKS, "--save", str(save)])
    assert load(save / "latest.pth")["state"]["completed"] == TASKS[:1]
    assert main([*TWO_TASKS, "--save", str(save)]) == 0
    for task in TASKS:
        _checkpoint_equal(load(reference["save"] / f"{task}.pth"), load(save / f"{task}.pth"), task)
    assert (reference["save"] / "accuracy_matrix.csv").read_text() == (save / "accuracy_matrix.csv").read_text()


def test_the_official_rule_lets_earlier_predictions_drift(tmp_path, monkeypatch, small_toy):
    """--moe-protect official freezes only each block's top-k experts by training counts: router 0 still uses
    others, which task 2 trains, so task 1's routed predictions move (what the default rule prevents)."""
    calls, original = [], MoERoutedHead.forward

    def forward(self, features):
        logits = original(self, features)
        calls.append((list(self.datasets), features.clone()))
        return logits

    monkeypatch.setattr(MoERoutedHead, "forward", forward)
    assert main([*TWO_TASKS, "--moe-protect", "official", "--save", str(tmp_path / "official")]) == 0
    before, after = [features for datasets, features in calls if datasets == TASKS[:1]]
    home = (before[:, -1] == 0) & (after[:, -1] == 0)
    assert home.any() and (before[home] - after[home]).abs().max() > 1e-4


def test_label_space_seen_equals_dataset_after_one_task(tmp_path, small_toy):
    cells = {}
    for space in ("dataset", "seen"):
        save = tmp_path / space
        assert main([*FAST, "--train-dataset", "ToyShape", "--eval-datasets", "ToyShape,ToyColor", "--iterations",
                     "3", "--label-space", space, "--save", str(save)]) == 0
        records = [json.loads(line) for line in (save / "results.jsonl").read_text().splitlines() if line.strip()]
        cells[space] = {(r["after_task"], r["dataset"]): r for r in records if r.get("after_task") is not None}
        assert cells[space][(1, "ToyShape")]["head"] == "moe-adapters"  # evaluated through the router
    for key in [(0, "ToyShape"), (1, "ToyShape")]:  # the trained task (a one-dataset layout) and the zero-shot row
        assert (cells["seen"][key]["top1"], cells["seen"][key]["top5"]) == \
            (cells["dataset"][key]["top1"], cells["dataset"][key]["top5"])
    # ToyColor, never trained, is ranked among ToyShape's classes too, by the method's own task-agnostic head
    assert cells["seen"][(1, "ToyColor")]["classes"] == 16 and cells["seen"][(1, "ToyColor")]["head"] == "moe-adapters"
    assert cells["dataset"][(1, "ToyColor")]["classes"] == 8


def test_refuses_a_resnet_in_one_line(tmp_path, capsys):
    code = main(["--model", "tiny-rn", "--method", "moe-adapters", "--train-dataset", "ToyShape", "--iterations",
                 "1", "--device", "cpu", "--save", str(tmp_path / "rn")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ResNet" in err[0], err
    assert not (tmp_path / "rn").exists()
