"""``--method embedding-adapter`` (residual low-rank maps on CLIP's normalised embeddings, CLIP frozen), its
class-masked InfoNCE and hard negatives, its head through checkpoints and ``--eval-only``, exact mid-task resume;
the per-part learning rates (``--lr-mult-*``) and their refusals; the baselines on a generated image folder.

Runs are in-process ``main([...])`` calls on ``micro-vit`` (one block per tower, 64-d embeddings) on ToyColorA
with ``--shots`` (a few training images), plus one command-line run on an image folder.
"""
from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mtil.datasets.folders import open_image_folder
from mtil.datasets.registry import open_dataset
from mtil.main import main
from mtil.methods.embedding_adapter import (
    EmbeddingAdapterMethod,
    class_masked_infonce,
    hard_negative_inputs,
    hardest_classes,
    update_confusion,
)
from mtil.methods.finetune import Finetune
from mtil.methods.part_lr import clip_part
from mtil.models.clip_loading import load_clip
from mtil.models.embedding_adapter import (
    EmbeddingAdapter,
    EmbeddingAdapterHead,
    ResidualLowRank,
    adapted_class_weight,
)
from mtil.models.heads import ZeroShotHead, head_from_state, head_state
from mtil.models.text import encode_texts, zeroshot_head
from tests.helpers import load, run_killed_at

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "micro-vit", "--batch-size", "8", "--lr", "1e-2", "--warmup-length", "1",
        "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0", "--device", "cpu",
        "--log-every", "0"]
ADAPTER = [*FAST, "--method", "embedding-adapter", "--train-dataset", "ToyColorA", "--shots", "4"]


def _refused(capsys, argv: list[str], *fragments: str) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtil: error:"), captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ identity at init


def test_a_fresh_adapter_leaves_features_and_logits_unchanged(micro):
    model = micro.model
    classes, templates = ["red", "green", "blue"], ["a photo of a {}.", "a {} thing."]
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    template_features = encode_texts(model, [t.format(c) for c in classes for t in templates]).view(3, 2, -1)
    adapter = EmbeddingAdapter(64, 16, 2.0, float(model.logit_scale.detach()), generator=torch.Generator().manual_seed(1))
    assert adapter.image.down.weight.abs().sum() > 0 and adapter.image.up.weight.abs().sum() == 0  # A drawn, B = 0
    head = EmbeddingAdapterHead(adapted_class_weight(adapter, template_features), adapter.image)
    zeroshot = ZeroShotHead(zeroshot_head(model, classes, templates))
    with torch.no_grad():
        plain = F.normalize(model.encode_image(images).float(), dim=-1)
        adapted = head.encode(model, images)
        torch.testing.assert_close(adapted, plain, rtol=0, atol=1e-6)
        torch.testing.assert_close(head(adapted), zeroshot(plain), rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.adapt_text(template_features), template_features, rtol=0, atol=1e-6)
    assert adapter.scale().item() == pytest.approx(model.logit_scale.exp().item())  # temperature from CLIP's


def test_the_adapter_is_a_renormalised_residual_low_rank_map():
    adapter = ResidualLowRank(4, 2, 3.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.up.weight.copy_(torch.arange(8.0).view(4, 2) / 10)
    e = F.normalize(torch.tensor([[1.0, 2.0, -1.0, 0.5]]), dim=-1)
    expected = e + 3.0 * (e @ adapter.down.weight.T) @ adapter.up.weight.T
    torch.testing.assert_close(adapter(e), expected / expected.norm(dim=-1, keepdim=True))


# ------------------------------------------------------------------------------------------------ the loss


def _hand_infonce(image, text, labels, scale, extra=None):
    """The definition, written out with Python loops: same-class pairs other than (i, i) leave both softmaxes."""
    n = len(labels)
    sim = [[scale * float(image[i] @ text[j]) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):  # image -> text
        terms = [sim[i][j] for j in range(n) if j == i or labels[j] != labels[i]] + (extra[i] if extra else [])
        total += -sim[i][i] + math.log(sum(math.exp(t) for t in terms))
    for j in range(n):  # text -> image
        terms = [sim[i][j] for i in range(n) if i == j or labels[i] != labels[j]]
        total += -sim[j][j] + math.log(sum(math.exp(t) for t in terms))
    return total / (2 * n)


def test_class_masked_infonce_matches_a_hand_computation():
    image = F.normalize(torch.tensor([[1.0, 0.2], [0.8, -0.5], [-0.3, 1.0], [0.1, -1.0], [0.7, 0.7]]), dim=-1)
    text = F.normalize(torch.tensor([[0.9, 0.1], [0.6, -0.6], [-0.2, 0.8], [0.3, -0.9], [1.0, 0.3]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 2, 1])
    value = class_masked_infonce(image, text, labels, torch.tensor(3.0))
    assert value.item() == pytest.approx(_hand_infonce(image, text, labels.tolist(), 3.0), rel=1e-6)
    # all classes distinct: plain CLIP InfoNCE
    distinct = torch.arange(5)
    logits = 3.0 * image @ text.T
    clip_loss = (F.cross_entropy(logits, distinct) + F.cross_entropy(logits.T, distinct)) / 2
    assert class_masked_infonce(image, text, distinct, torch.tensor(3.0)).item() == pytest.approx(clip_loss.item())
    assert value.item() != pytest.approx(clip_loss.item())  # the mask changes the loss here


def test_a_same_class_pair_is_no_negative_in_either_direction_but_another_class_pair_is():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 2])
    base = class_masked_infonce(image, text, labels, torch.tensor(5.0)).item()
    # One extra coordinate that only image i and text j have adds 2 to similarity (i, j) and to nothing else.
    pad = lambda x: torch.cat([x, torch.zeros(len(x), 1)], dim=1)  # noqa: E731
    for target, changes in (((0, 1), False), ((1, 0), False), ((0, 2), True), ((2, 0), True), ((3, 1), True)):
        img, txt = pad(image), pad(text)
        img[target[0], -1], txt[target[1], -1] = 1.0, 2.0  # adds 2 to similarity (i, j) and to nothing else
        value = class_masked_infonce(img, txt, labels, torch.tensor(5.0)).item()
        assert (value != pytest.approx(base, abs=1e-6)) == changes, (target, value, base)
        assert value == pytest.approx(_hand_infonce(img, txt, labels.tolist(), 5.0), rel=1e-6)


# ------------------------------------------------------------------------------------------------ hard negatives


def test_hard_negatives_are_mined_per_class_from_the_running_confusion():
    confusion = torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.5, 0.3], [0.05, 0.9, 0.05]])
    assert hardest_classes(confusion, 1).squeeze(1).tolist() == [2, 2, 1]
    assert hardest_classes(confusion, 2).tolist() == [[2, 1], [2, 0], [1, 0]]
    # Class 0's images put their mass on class 1: its row moves there (m = 0.5 per update) and the mining follows.
    probabilities = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.0, 0.1, 0.9]])
    labels = torch.tensor([0, 0, 2])
    update_confusion(confusion, probabilities, labels, momentum=0.5)
    torch.testing.assert_close(confusion[0], 0.5 * torch.tensor([0.6, 0.1, 0.3]) + 0.5 * torch.tensor([0.15, 0.75, 0.1]))
    torch.testing.assert_close(confusion[1], torch.tensor([0.2, 0.5, 0.3]))  # not in the batch: unchanged
    assert hardest_classes(confusion, 1).squeeze(1).tolist() == [1, 2, 1]


def test_hard_negatives_change_the_loss_and_push_away_from_the_confused_class():
    torch.manual_seed(1)
    class_text = F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 1, 0])  # classes 2 and 3 are not in the batch
    image = F.normalize(class_text[labels] + 0.3 * torch.randn(3, 8), dim=-1)
    hard = torch.tensor([[3], [0], [1], [2]])  # class 0's hardest: 3 (not in the batch); class 1's: 0 (present)
    extra, valid = hard_negative_inputs(class_text, labels, hard)
    assert valid.squeeze(1).tolist() == [True, False, True]  # a hard class already in the batch is not added twice
    torch.testing.assert_close(extra[:, 0], class_text[[3, 0, 3]])
    scale = torch.tensor(4.0)
    plain = class_masked_infonce(image, class_text[labels], labels, scale)
    with_hard = class_masked_infonce(image, class_text[labels], labels, scale, extra, valid)
    hand_extra = [[4.0 * float(image[0] @ class_text[3])], [], [4.0 * float(image[2] @ class_text[3])]]
    assert with_hard.item() == pytest.approx(_hand_infonce(image, class_text[labels], labels.tolist(), 4.0,
                                                           hand_extra), rel=1e-6)
    assert with_hard.item() > plain.item()
    # The gradient pushes image 0 away from the mined class's prompt: moving it there raises the loss.
    moved = image.clone()
    moved[0] = F.normalize(image[0] + 0.2 * class_text[3], dim=-1)
    again = class_masked_infonce(moved, class_text[labels], labels, scale, extra, valid)
    assert again.item() > with_hard.item()
    image.requires_grad_(True)
    class_masked_infonce(image, class_text[labels], labels, scale, extra, valid).backward()
    assert float(image.grad[0] @ class_text[3]) > 0  # descent (−grad) lowers the similarity to class 3


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture
def captured_adapters(monkeypatch):
    """The adapter and temperature values at each task's start and end; CLIP's gradients seen at every step."""
    record: dict[str, list] = {"start": [], "end": [], "clip_grads": []}
    before, after, step = (EmbeddingAdapterMethod.before_task, EmbeddingAdapterMethod.after_task,
                           EmbeddingAdapterMethod.after_step)

    def snapshot(self):
        return {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}

    def recording_before(self, run, task):
        before(self, run, task)
        record["start"].append(snapshot(self))

    def recording_after(self, run, task):
        record["end"].append(snapshot(self))
        record["head"] = self.head
        after(self, run, task)

    def recording_step(self, run):
        record["clip_grads"].append(any(p.grad is not None or p.requires_grad for p in run.model.parameters()))
        step(self, run)

    monkeypatch.setattr(EmbeddingAdapterMethod, "before_task", recording_before)
    monkeypatch.setattr(EmbeddingAdapterMethod, "after_task", recording_after)
    monkeypatch.setattr(EmbeddingAdapterMethod, "after_step", recording_step)
    return record


def test_only_the_adapters_and_temperature_train_and_eval_only_reads_the_same_head(tmp_path, captured_adapters,
                                                                                    capsys):
    save = tmp_path / "run"
    assert main([*ADAPTER, "--iterations", "6", "--save", str(save)]) == 0
    start, end = captured_adapters["start"][0], captured_adapters["end"][0]
    assert set(start) == {"log_scale", "image.down.weight", "image.up.weight", "text.down.weight", "text.up.weight"}
    for name in start:
        assert not torch.equal(start[name], end[name]), name  # every adapter tensor and the temperature moved
    assert captured_adapters["clip_grads"] == [False] * 6  # no CLIP parameter ever required or got a gradient
    checkpoint = load(save / "ToyColorA.pth")
    fresh = load_clip("micro-vit", seed=0).model.state_dict()
    assert checkpoint["model"].keys() == fresh.keys()
    assert all(torch.equal(checkpoint["model"][k], fresh[k]) for k in fresh)  # CLIP unchanged, bit for bit

    # The head in the checkpoint: the trained image adapter and the adapted class weight; it round-trips.
    entry = checkpoint["heads"]["ToyColorA"]
    assert entry["kind"] == "embedding-adapter"
    torch.testing.assert_close(entry["tensors"]["image.up"], end["image.up.weight"], rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(head_state(captured_adapters["head"]), buffer)
    buffer.seek(0)
    again = head_from_state(torch.load(buffer, weights_only=True))
    model = load_clip("micro-vit", seed=0).model.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        original = captured_adapters["head"]
        torch.testing.assert_close(again.encode(model, images), original.encode(model, images), rtol=0, atol=0)
        features = original.encode(model, images)
        torch.testing.assert_close(again(features), original(features), rtol=0, atol=0)
        plain = F.normalize(model.encode_image(images), dim=-1)
        assert not torch.allclose(features, plain, atol=1e-4)  # the trained adapter does change the features

    trained = pd.read_csv(save / "accuracy_matrix.csv")
    trained_top1 = trained[trained.after_task == 1].top1.item()
    capsys.readouterr()
    assert main(["--eval-only", "--load", str(save / "ToyColorA.pth"), "--eval-datasets", "ToyColorA",
                 "--model", "micro-vit", "--max-evaluation-size", "24", "--batch-size-eval", "24", "--workers", "0",
                 "--device", "cpu", "--save", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "learned head" in out
    evaluated = pd.read_json(tmp_path / "eval" / "results.jsonl", lines=True)
    assert evaluated.top1.item() == pytest.approx(trained_top1)
    assert evaluated["head"].item() == "embedding-adapter"


@pytest.mark.parametrize("mode, image, text", [("image", True, False), ("text", False, True)])
def test_the_train_mode_picks_which_adapter_exists(tmp_path, captured_adapters, mode, image, text):
    assert main([*ADAPTER, "--iterations", "2", "--train-mode", mode, "--save", str(tmp_path / mode)]) == 0
    names = set(captured_adapters["start"][0])
    assert ("image.up.weight" in names) == image and ("text.up.weight" in names) == text
    tensors = load(tmp_path / mode / "ToyColorA.pth")["heads"]["ToyColorA"]["tensors"]
    assert ("image.down" in tensors) == image


def test_a_run_killed_mid_task_resumes_exactly_with_hard_negatives(tmp_path, monkeypatch):
    argv = [*ADAPTER, "--iterations", "6", "--checkpoint-interval", "2", "--hard-negatives", "1",
            "--eval-interval", "3"]
    assert main([*argv, "--save", str(tmp_path / "straight")]) == 0
    killed = tmp_path / "killed"
    run_killed_at(monkeypatch, [*argv, "--save", str(killed)], [], 5, method=EmbeddingAdapterMethod)
    saved = load(killed / "latest.pth")
    assert saved["state"]["step"] == 4
    state = saved["methods"]["embedding-adapter"]
    assert state["task"] == "ToyColorA" and state["confusion"].shape == (4, 4)
    head = saved["heads"]["ToyColorA"]  # the mid-task head is the adapter of that step, text side included
    assert head["kind"] == "embedding-adapter"
    assert torch.equal(head["tensors"]["image.up"], state["adapter"]["image.up.weight"])
    assert state["adapter"]["text.up.weight"].abs().sum() > 0
    data = open_dataset("ToyColorA", "data", False)
    model = load_clip("micro-vit", seed=0).model.eval()
    prompts = encode_texts(model, [t.format(c) for c in data.classnames for t in data.templates])
    adapter = EmbeddingAdapter(64, 16, 2.0, 0.0)
    adapter.load_state_dict(state["adapter"])
    with torch.no_grad():
        expected = adapted_class_weight(adapter, prompts.view(len(data.classnames), len(data.templates), -1))
    torch.testing.assert_close(head["tensors"]["weight"], expected, rtol=0, atol=1e-6)
    assert main([*argv, "--save", str(killed)]) == 0
    straight = load(tmp_path / "straight" / "ToyColorA.pth")["heads"]["ToyColorA"]["tensors"]
    resumed = load(killed / "ToyColorA.pth")["heads"]["ToyColorA"]["tensors"]
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # the mid-task evaluation at step 3 used the head of that step (it is in results.jsonl)
    rows = pd.read_json(tmp_path / "straight" / "results.jsonl", lines=True)
    assert 3 in rows.iteration.tolist()


# ------------------------------------------------------------------------------------------------ per-part lrs


def test_per_part_learning_rates_are_in_the_optimiser_groups_and_warm_up_per_group(tmp_path, monkeypatch):
    seen: list[list[dict]] = []
    original = Finetune.after_step

    def recording(self, run):
        original(self, run)
        names = {id(p): n for n, p in run.model.named_parameters()}
        seen.append([{"part": g["part"], "lr": g["lr"], "initial": g["initial_lr"],
                      "names": [names.get(id(p)) for p in g["params"]]} for g in run.task.optimizer.param_groups])

    monkeypatch.setattr(Finetune, "after_step", recording)
    assert main([*FAST, "--method", "finetune", "--train-dataset", "ToyColorA", "--shots", "2", "--iterations", "3",
                 "--lr", "1e-3", "--warmup-length", "4", "--lr-mult-text", "0.1", "--lr-mult-proj", "10",
                 "--freeze", "token_embedding.*", "--save", str(tmp_path / "run")]) == 0
    groups = {g["part"]: g for g in seen[0]}
    assert list(groups) == ["vision", "text", "proj"]
    assert groups["vision"]["initial"] == pytest.approx(1e-3)  # no --lr-mult-vision: x 1
    assert groups["text"]["initial"] == pytest.approx(1e-4)
    assert groups["proj"]["initial"] == pytest.approx(1e-2)
    assert sorted(groups["proj"]["names"]) == ["text_projection", "visual.proj"]
    assert all(n.startswith("visual.") and n != "visual.proj" for n in groups["vision"]["names"])
    assert "token_embedding.weight" not in groups["text"]["names"] and "logit_scale" not in groups["text"]["names"]
    assert all(not n.startswith("visual.") for n in groups["text"]["names"])
    for step, groups_at in enumerate(seen, 1):  # the warm-up factor (step + 1) / 4 applies to every group alike
        for group in groups_at:
            assert group["lr"] == pytest.approx(group["initial"] * (step + 1) / 4), (step, group["part"])
    assert clip_part("visual.attnpool.c_proj.weight") == "proj" and clip_part("visual.conv1.weight") == "vision"


@pytest.mark.parametrize("extra, fragments", [
    (["--method", "finetune", "--train-mode", "fc", "--lr-mult-text", "0.1"], ["--lr-mult-text", "fc"]),
    (["--method", "embedding-adapter", "--lr-mult-vision", "2"], ["embedding-adapter", "--lr-mult-vision"]),
    (["--method", "finetune", "--lr-multipliers", "text=0.1", "--lr-mult-proj", "2"], ["--lr-multipliers"]),
    (["--method", "finetune", "--train-mode", "image", "--lr-mult-text", "0.1"], ["--lr-mult-text", "image"]),
    (["--method", "finetune", "--lora", "--lr-mult-text", "0.1"], ["--lora"]),
    (["--method", "embedding-adapter", "--freeze", "visual.*"], ["--freeze"]),
    (["--method", "embedding-adapter", "--hard-negatives", "4"], ["--hard-negatives 4", "4 classes"]),
    (["--method", "embedding-adapter", "--adapter-rank", "65"], ["--adapter-rank 65", "64"]),
    (["--method", "embedding-adapter", "--ls", "0.1"], ["--ls"]),
    (["--method", "embedding-adapter", "--base-new"], ["--base-new"]),
    (["--method", "embedding-adapter", "--train-mode", "fc"], ["--train-mode fc"]),
    (["--method", "finetune", "--hard-negatives", "1"], ["--hard-negatives", "embedding-adapter"]),
])
def test_what_cannot_work_is_one_line_and_writes_nothing(tmp_path, capsys, extra, fragments):
    save = tmp_path / "run"
    _refused(capsys, [*FAST, "--train-dataset", "ToyColorA", "--shots", "2", "--iterations", "2", *extra,
                      "--save", str(save)], *fragments)
    assert not save.exists()


# ------------------------------------------------------------------------------------------------ image folders


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> Path:
    """ToyColorB as an image folder from scripts/export_toy_folder.py, its evaluation split named validation/."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from export_toy_folder import export
    finally:
        sys.path.remove(str(REPO / "scripts"))
    root = tmp_path_factory.mktemp("folder") / "toy_colorb"
    export("ToyColorB", root, {"train": 8, "test": 6})
    shutil.move(str(root / "test"), str(root / "validation"))
    return root


def test_an_image_folder_with_validation_or_val_evaluates_on_it(toy_folder, tmp_path):
    data = open_image_folder(toy_folder, "x")
    assert data.classnames == ["cyan", "orange", "purple", "white"]
    assert len(data.raw("test")) == 24 and len(data.raw("val")) == 24
    other = tmp_path / "val_named"
    shutil.copytree(toy_folder, other)
    shutil.move(str(other / "validation"), str(other / "val"))
    assert len(open_image_folder(other, "y").raw("test")) == 24


@pytest.mark.parametrize("name, flags", [
    ("zeroshot", ["--method", "zeroshot"]),
    ("linear-probe", ["--method", "finetune", "--train-mode", "fc", "--iterations", "2"]),
    ("finetune", ["--method", "finetune", "--iterations", "2"]),
    ("part-lr", ["--method", "finetune", "--iterations", "2", "--lr-mult-text", "0.1", "--lr-mult-proj", "2"]),
])
def test_the_baselines_run_on_a_few_shot_image_folder(toy_folder, tmp_path, name, flags):
    save = tmp_path / name
    base = FAST if name != "zeroshot" else FAST[:2] + FAST[8:]  # zero-shot refuses the training flags
    argv = [*base, "--train-dataset", f"ImageFolder:{toy_folder}", "--shots", "1", *flags, "--save", str(save)]
    assert main(argv) == 0
    fewshot = pd.read_csv(save / "fewshot.csv")
    assert set(fewshot.split) == {"test", "val"}


def test_the_command_line_trains_an_embedding_adapter_on_an_image_folder(toy_folder, tmp_path):
    save = tmp_path / "cli"
    command = [sys.executable, "-m", "mtil.main", *FAST, "--method", "embedding-adapter",
               "--train-dataset", f"ImageFolder:{toy_folder}", "--shots", "2", "--iterations", "4",
               "--hard-negatives", "2", "--adapter-rank", "8", "--adapter-scaling", "1", "--save", str(save)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "infonce" not in result.stderr
    pths = [p for p in save.glob("*.pth") if p.name not in ("latest.pth", "latest.prev.pth")]
    assert len(pths) == 1
    checkpoint = load(pths[0])
    (entry,) = checkpoint["heads"].values()
    assert entry["kind"] == "embedding-adapter" and entry["tensors"]["image.down"].shape == (8, 64)
    assert float(entry["tensors"]["image.scaling"]) == 1.0
    assert (save / "fewshot.csv").is_file()
