"""Damaged data is told apart from missing data, ``check_readable`` decodes the first item of each split, and the
original tool's evaluation sets that mtil does not build in point to ``ImageFolder:PATH``.

The valid files come from ``tests/fixtures/dataset_formats.py``; each test then damages one of them.
"""
from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import pytest
from PIL import Image

from mtil.datasets import registry, toyworld
from mtil.datasets.base import TaskData
from mtil.datasets.registry import DatasetEntry, check_readable, find_entry, open_dataset
from mtil.errors import UserError
from tests.fixtures import dataset_formats as fx

MNIST_LAYOUT = "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"


def user_error(call, *args, **kwargs) -> str:
    """The message of the UserError ``call`` raises; it must be one line."""
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


def mnist(root: Path) -> Path:
    fx.make_mnist(root, 3, 2)
    return root / "MNIST" / "raw"


# --------------------------------------------------------------------------- #
# damaged files
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("keep", [0, 6, 100], ids=["zero-byte", "truncated-header", "truncated-pixels"])
def test_damaged_mnist_train_images_could_not_be_read(tmp_path, keep):
    images = mnist(tmp_path) / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:keep])
    message = user_error(check_readable, "MNIST", tmp_path)
    assert message.startswith(f"MNIST files under {tmp_path} could not be read (train split, ")
    assert f"expected {MNIST_LAYOUT}" in message and "re-download" in message
    assert "not found" not in message
    assert not registry._OPEN  # a failure is not cached
    # open_dataset (which check_readable starts with) says the same: damaged, not missing
    assert user_error(open_dataset, "MNIST", tmp_path) == message


def test_damaged_mnist_test_labels_name_the_test_split(tmp_path):
    (mnist(tmp_path) / "t10k-labels-idx1-ubyte").write_bytes(b"")
    message = user_error(check_readable, "MNIST", tmp_path, splits=("test",))
    assert "MNIST" in message and "could not be read (test split, ValueError: " in message


def test_image_folder_skips_a_damaged_image_with_a_warning(tmp_path, capsys):
    """A zero-byte first image is skipped (replaced by the next readable one) and named once on stderr: a damaged
    file met hours into a run no longer ends it with a traceback, on every re-run."""
    root = tmp_path / "set"
    fx.make_image_folder(root, 3, 2)
    empty = root / "train" / "class_000" / "a_empty.png"  # sorts before class_000_0.jpg: item 0 of train
    empty.write_bytes(b"")
    raw = open_dataset(f"ImageFolder:{root}", tmp_path).raw("train")
    assert raw.samples[0][0] == str(empty)
    image, label = raw[0]
    assert label == raw.samples[1][1] and image.size == Image.open(raw.samples[1][0]).size
    raw[0]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "skipped unreadable image" in line]
    assert len(warnings) == 1 and str(empty) in warnings[0] and "1 skipped" in warnings[0]


def test_image_folder_skips_a_decompression_bomb(tmp_path, monkeypatch, capsys):
    root = tmp_path / "set"
    fx.make_image_folder(root, 2, 2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8)  # a 16x16 test image is then over twice the limit
    raw = open_dataset(f"ImageFolder:{root}", tmp_path).raw("train")
    with pytest.raises(UserError, match="no image under .* could be read"):
        raw[0]
    assert "DecompressionBombError" in capsys.readouterr().err


def test_undecodable_first_image_of_a_torchvision_set_is_named(tmp_path):
    fx.make_food101(tmp_path, 2, 1)
    for image in (tmp_path / "food-101" / "images").rglob("*.jpg"):
        image.write_bytes(image.read_bytes()[:60])  # a JPEG header without its pixels
    first = open_dataset("Food", tmp_path).raw("train")._image_files[0]
    message = user_error(check_readable, "Food", tmp_path, splits=("train",))
    assert f"could not be read (train split, first image {first}, OSError: " in message
    assert "food-101/" in message


def test_any_exception_while_opening_is_one_line(tmp_path, monkeypatch):
    def broken(root, download):
        raise ValueError("bad header\nsecond line")

    monkeypatch.setitem(registry.REGISTRY, "Broken", DatasetEntry("Broken", broken, "broken/LAYOUT"))
    message = user_error(open_dataset, "Broken", tmp_path)
    assert message == (f"Broken files under {tmp_path} could not be read (ValueError: bad header second line): "
                       f"expected broken/LAYOUT; replace the damaged file(s) (e.g. delete them and re-download "
                       f"with --download)")

    def interrupted(root, download):
        raise KeyboardInterrupt

    monkeypatch.setitem(registry.REGISTRY, "Broken", DatasetEntry("Broken", interrupted, "broken/LAYOUT"))
    with pytest.raises(KeyboardInterrupt):
        open_dataset("Broken", tmp_path)


def test_failed_download_is_not_called_damage(tmp_path, monkeypatch):
    def offline(root, download):
        raise urllib.error.URLError("no network")

    monkeypatch.setitem(registry.REGISTRY, "Remote", DatasetEntry("Remote", offline, "remote/LAYOUT"))
    message = user_error(check_readable, "Remote", tmp_path, download=True)
    assert message.startswith(f"Remote data not found under {tmp_path}: expected remote/LAYOUT.")
    assert "The download failed (URLError: " in message and "no network" in message


# --------------------------------------------------------------------------- #
# missing files and splits
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("missing", [None, "t10k-images-idx3-ubyte"], ids=["no-files", "one-file"])
def test_missing_files_are_still_not_found(tmp_path, missing):
    location = tmp_path / "data"
    if missing:
        (mnist(location) / missing).unlink()
    message = user_error(check_readable, "MNIST", location)
    assert message.startswith(f"MNIST data not found under {location}: expected {MNIST_LAYOUT}.")
    assert "--download" in message and "could not be read" not in message


def test_missing_image_file_is_named(tmp_path):
    fx.make_food101(tmp_path, 2, 1)
    data = open_dataset("Food", tmp_path)
    first = data.raw("train")._image_files[0]
    Path(first).unlink()
    message = user_error(check_readable, "Food", tmp_path)
    assert message.startswith(f"Food data not found under {tmp_path} (train split) (missing {first}): expected ")


def test_evaluation_only_image_folder(tmp_path):
    root = tmp_path / "imagenet-r"
    fx.make_image_folder(root, 3, 2, splits=("test",))
    (root / "classnames.txt").write_text("goldfish\ngreat white shark\nhammerhead\n")
    data = check_readable(f"ImageFolder:{root}", tmp_path, splits=("test",))
    assert data.classnames == ["goldfish", "great white shark", "hammerhead"]
    assert set(data.openers) == {"test"} and len(data.raw("test")) == 6
    message = user_error(check_readable, f"ImageFolder:{root}", tmp_path)  # a training task needs train/
    assert "has no train split (it has test)" in message
    with pytest.raises(KeyError):  # what TaskData.raw raised before, still
        data.raw("train")


# --------------------------------------------------------------------------- #
# what passes
# --------------------------------------------------------------------------- #
def test_valid_datasets_pass(tmp_path):
    mnist(tmp_path)
    data = check_readable("MNIST", tmp_path)
    assert isinstance(data, TaskData) and data is open_dataset("MNIST", tmp_path)
    root = tmp_path / "set"
    fx.make_image_folder(root, 2, 1)
    assert set(check_readable(f"ImageFolder:{root}", tmp_path, splits=("train", "test", "val")).openers) == {
        "train", "test", "val"}


@pytest.mark.parametrize("name", sorted(toyworld.TASKS))
def test_toy_tasks_pass_rendering_one_image_per_split(tmp_path, name, monkeypatch):
    rendered = []
    original = toyworld.ToyTaskDataset.__getitem__

    def counting(self, index):
        rendered.append((self.split, index))
        return original(self, index)

    monkeypatch.setattr(toyworld.ToyTaskDataset, "__getitem__", counting)
    location = tmp_path / "no-data-here"
    assert isinstance(check_readable(name, location), TaskData)
    assert rendered == [("train", 0), ("test", 0)]
    assert not location.exists()


# --------------------------------------------------------------------------- #
# the original tool's evaluation sets
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(registry.NOT_BUILT_IN))
def test_original_tool_names_point_to_image_folder(name):
    message = user_error(find_entry, name)
    assert message.startswith(f"{name} ({registry.NOT_BUILT_IN[name]}) is not built into mtil: ")
    assert "place its images as PATH/test/<class>/ and use ImageFolder:PATH" in message
    assert "PATH/classnames.txt" in message and "unknown dataset" not in message
    assert user_error(open_dataset, name, "data") == message


def test_original_tool_names_in_other_spellings_and_other_names():
    assert {"ImageNetA", "ImageNetR", "ImageNetSketch", "ImageNetV2", "ObjectNet", "YTBB", "ImageNetVidRobust",
            "FMOW", "IWildCam"} == set(registry.NOT_BUILT_IN)
    assert "(ImageNet-R) is not built into mtil" in user_error(find_entry, "imagenet-r")
    assert "(iWildCam-WILDS) is not built into mtil" in user_error(find_entry, "iwildcam")
    assert user_error(find_entry, "ImageNetQ").startswith("unknown dataset 'ImageNetQ'")


def test_image_folder_with_an_empty_class_folder_names_it(tmp_path):
    root = tmp_path / "set"
    fx.make_image_folder(root, 3, 2)
    for image in (root / "train" / "class_001").iterdir():
        image.unlink()
    (root / "train" / "class_001" / "notes.txt").write_text("not an image")
    message = user_error(check_readable, f"ImageFolder:{root}", tmp_path)
    assert "class folder(s) class_001 in" in message and "hold no image" in message


def test_image_folder_whose_test_split_lacks_a_class_names_it(tmp_path):
    root = tmp_path / "set"
    fx.make_image_folder(root, 3, 2)
    shutil.rmtree(root / "test" / "class_002")
    message = user_error(check_readable, f"ImageFolder:{root}", tmp_path)
    assert "lacks class folder(s) class_002" in message


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16", "CMYK", "1"])
def test_image_folder_reads_any_pil_mode_as_rgb(tmp_path, mode):
    """RGBA, grayscale, palette, 16-bit and CMYK images in a folder train and evaluate like RGB ones."""
    from mtil.models.transforms import eval_transform

    root = tmp_path / "set"
    fx.make_image_folder(root, 2, 2, splits=("train", "test"))
    odd = sorted((root / "train" / "class_001").iterdir())[0]
    odd.unlink()
    colour = Image.new("RGB", (16, 16), (200, 30, 30))
    converted = colour.convert(mode) if mode != "I;16" else colour.convert("L").convert("I;16")
    target = odd.with_suffix(".jpg" if mode == "CMYK" else ".png")
    converted.save(target)
    assert Image.open(target).mode == mode
    data = check_readable(f"ImageFolder:{root}", tmp_path)
    dataset = data.dataset("train", eval_transform(32))
    index = [Path(p).name for p, _ in data.raw("train").samples].index(target.name)
    tensor, label = dataset[index]
    assert tensor.shape == (3, 32, 32) and tensor.isfinite().all() and label == 1


def test_a_one_class_dataset_is_refused(tmp_path, capsys):
    """One class: every prediction is right, so training reported 100 % without a word (issue 25). Now the run is
    refused in one line before anything is written; two classes are fine."""
    root = tmp_path / "one"
    fx.make_image_folder(root, 1, 2)
    with pytest.raises(UserError, match="has 1 class .*two or more"):
        check_readable(f"ImageFolder:{root}", tmp_path)
    from mtil.main import main

    save = tmp_path / "run"
    assert main(["--model", "micro-vit", "--device", "cpu", "--workers", "0", "--train-dataset",
                 f"ImageFolder:{root}", "--iterations", "1", "--save", str(save)]) == 2
    assert "two or more" in capsys.readouterr().err and not save.exists()
    two = tmp_path / "two"
    fx.make_image_folder(two, 2, 2)
    check_readable(f"ImageFolder:{two}", tmp_path)
