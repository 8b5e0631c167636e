"""``python -m mtil.data status|prepare``: what status says of a data folder with nothing, a small copy laid out
like a real dataset and a damaged one (and that it writes nothing); prepare through torchvision's own download
code on local fixture archives only (torchvision's ``download_url`` is replaced: never the network), resumed after
an interruption mid-extraction and after a download cut short, from archives the user downloaded, and refusing
unknown names with a guess, all in one-line errors.

A complete copy of a real dataset is thousands of images: the tests shrink the expected counts of the one dataset
they lay out (``small``) to the fixture's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mtil.data import catalog, cli
from mtil.data.check import DAMAGED, MISSING, PRESENT, check
from tests.fixtures import dataset_formats as fx

ROOT = Path(__file__).resolve().parents[1]
DTD_URL_FILE = "dtd-r1.0.1.tar.gz"


# --------------------------------------------------------------------------------------------- helpers
def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def small(monkeypatch, name: str, classes: int, **images: int) -> None:
    """Expect the fixture's counts of ``name`` instead of a complete copy's."""
    facts = dataclasses.replace(catalog.CATALOG[name], classes=classes, images=dict(images))
    monkeypatch.setitem(catalog.CATALOG, name, facts)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its size and modification time (``{}`` when root does not exist)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


def row(out: str, name: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(f"  {name} ")]
    assert len(lines) == 1, out
    return lines[0]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtil.data: error: "), err
    assert "Traceback" not in err
    return lines[0]


def tar_gz(folder: Path, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=arcname)
    return buffer.getvalue()


@pytest.fixture
def dtd_archive(tmp_path_factory) -> bytes:
    """A small dtd-r1.0.1.tar.gz: its top folder ``dtd/`` holds images/ and labels/ as the real one."""
    source = tmp_path_factory.mktemp("dtd-source")
    fx.make_dtd(source, num_classes=3, per_class=2)
    return tar_gz(source / "dtd" / "dtd", "dtd")


@pytest.fixture
def downloads(monkeypatch):
    """Replace torchvision's ``download_url`` (which ``download_and_extract_archive`` calls) by a copy of local
    fixture bytes; like the real one it keeps a file already there whose content (md5) is right. ``served`` maps a
    file name to its bytes; ``log`` lists (file name, "fetched" | "reused")."""
    import torchvision.datasets.utils as tv_utils

    class Downloads:
        served: dict[str, bytes] = {}
        log: list[tuple[str, str]] = []

    def fake_download_url(url, root, filename=None, md5=None, max_redirect_hops=3):
        filename = filename or Path(url).name
        target = Path(root) / filename
        wanted = Downloads.served[filename]
        if target.is_file() and hashlib.md5(target.read_bytes()).digest() == hashlib.md5(wanted).digest():
            Downloads.log.append((filename, "reused"))
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(wanted)
        Downloads.log.append((filename, "fetched"))

    monkeypatch.setattr(tv_utils, "download_url", fake_download_url)
    Downloads.served, Downloads.log = {}, []
    return Downloads


# --------------------------------------------------------------------------------------------- the catalog
def test_catalog_covers_the_registry_and_its_class_counts():
    from mtil.datasets import classnames as C
    from mtil.datasets.captions import CAPTION_DATASETS
    from mtil.datasets.registry import dataset_names

    assert set(dataset_names()) | set(CAPTION_DATASETS) <= set(catalog.CATALOG)
    assert {"ImageNet", "ConceptualCaptions"} <= set(catalog.CATALOG)
    assert set(catalog.MTIL_ELEVEN) <= set(catalog.CATALOG) and len(catalog.MTIL_ELEVEN) == 11
    lists = {"CIFAR10": C.CIFAR10_CLASSNAMES, "CIFAR100": C.CIFAR100_CLASSNAMES, "DTD": C.DTD_CLASSNAMES,
             "MNIST": C.MNIST_CLASSNAMES, "EuroSAT": C.EUROSAT_READABLE, "Flowers": C.FLOWERS102_CLASSNAMES,
             "ImageNet": C.IMAGENET_CLASSNAMES}
    assert {name: catalog.CATALOG[name].classes for name in lists} == {name: len(v) for name, v in lists.items()}


# --------------------------------------------------------------------------------------------- status
def test_status_of_nothing_lists_every_dataset_with_how_to_get_it(tmp_path, capsys):
    location = tmp_path / "data"  # does not exist: status must not create it
    code, out, err = run(capsys, "status", "--data-location", str(location))
    assert code == 0 and err == ""
    assert not location.exists()
    for name, facts in catalog.CATALOG.items():
        assert row(out, name).split()[1] == (PRESENT if facts.kind == catalog.GENERATED else MISSING)
    assert "- / train 3,334, test 3,333" in row(out, "Aircraft") and row(out, "Aircraft").endswith("- / 100")
    how = {line.split(":")[0].strip(): line for line in out.split("To get the missing ones:")[1].splitlines()
           if line.startswith("  ")}
    flag = f"--data-location {location}"
    assert f"python -m mtil.data prepare DTD {flag} (torchvision downloads dtd-r1.0.1.tar.gz" in how["DTD"]
    assert "https://image-net.org" in how["ImageNet"] and "ILSVRC2012_img_val.tar" in how["ImageNet"]
    assert "ImageNet/train/<wnid>/*.JPEG" in how["ImageNet"]
    assert "Validation_GCC-1.1.0-Validation.tsv" in how["ConceptualCaptions"]
    assert "--ref-sentences random" in how["ConceptualCaptions"]
    assert "car_devkit.tgz" in how["StanfordCars"] and "stanford_cars/{cars_train/" in how["StanfordCars"]
    assert set(how) == {n for n, f in catalog.CATALOG.items() if f.kind != catalog.GENERATED}
    assert "0 of the eleven MTIL datasets present" in out


def test_status_of_a_small_copy_laid_out_like_dtd(tmp_path, capsys, monkeypatch):
    fx.make_dtd(tmp_path, num_classes=3, per_class=2)
    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "status", "DTD", "Aircraft", "--data-location", str(tmp_path))
    assert code == 0, err
    assert row(out, "DTD").split()[:2] == ["DTD", PRESENT]
    assert "train 6, test 6 / train 6, test 6" in row(out, "DTD") and row(out, "DTD").endswith("3 / 3")
    assert row(out, "Aircraft").split()[1] == MISSING
    assert snapshot(tmp_path) == before  # nothing written


def test_status_counts_against_a_complete_copy(tmp_path):
    fx.make_dtd(tmp_path, num_classes=3, per_class=2)  # the real expected counts: 1,880 + 1,880 images, 47 classes
    status = check("DTD", tmp_path)
    assert status.state == DAMAGED and status.images == {"train": 6, "test": 6} and status.classes == 3
    assert "train 6 images, a complete copy has 1,880" in status.detail and "3 classes" in status.detail


@pytest.mark.parametrize("damage", ["truncated annotation file", "missing images", "empty image"])
def test_status_of_a_damaged_copy(tmp_path, capsys, monkeypatch, damage):
    fx.make_dtd(tmp_path, num_classes=3, per_class=2)
    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    data = tmp_path / "dtd" / "dtd"
    if damage == "truncated annotation file":
        labels = data / "labels" / "train1.txt"
        labels.write_bytes(labels.read_bytes()[: len(labels.read_bytes()) // 2])
        expected = "train 3 images, a complete copy has 6"
    elif damage == "missing images":
        first = (data / "labels" / "test1.txt").read_text().split()[0]
        (data / "images" / first).unlink()
        expected = f"1 listed image files are missing (first: {data / 'images' / first})"
    else:
        first = (data / "labels" / "train1.txt").read_text().split()[0]
        (data / "images" / first).write_bytes(b"")
        expected = "1 image files are empty"
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "status", "DTD", "--data-location", str(tmp_path))
    assert code == 0, err
    assert row(out, "DTD").split()[1] == DAMAGED
    damaged = out.split("Damaged:")[1]
    assert expected in damaged
    assert f"Move {tmp_path / 'dtd'} away" in damaged and f"prepare DTD --data-location {tmp_path}" in damaged
    assert snapshot(tmp_path) == before


def test_status_on_an_empty_folder_in_a_fresh_process_is_quick_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtil.data", "status", "--data-location", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    assert row(result.stdout, "SUN397").split()[1] == MISSING
    assert list(tmp_path.iterdir()) == []
    probe = subprocess.run([sys.executable, "-c", "import sys, mtil.data.cli, mtil.data.report, mtil.data.check;"
                            "print('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False"  # names and --help answer without importing torch


# --------------------------------------------------------------------------------------------- names and errors
@pytest.mark.parametrize("argv, expected", [
    (["prepare", "Aircaft"], "unknown dataset 'Aircaft' (did you mean Aircraft?)"),
    (["prepare", "DTD,sun397"], "unknown dataset 'sun397' (did you mean SUN397?)"),
    (["status", "imagenet"], "unknown dataset 'imagenet' (did you mean ImageNet?)"),
    (["prepare", "ConceptualCaption"], "unknown dataset 'ConceptualCaption' (did you mean ConceptualCaptions?)"),
    (["prepare", "Qwerty"], "unknown dataset 'Qwerty'; known: Aircraft, Caltech101"),
    (["prepare"], "the following arguments are required: NAME"),
    ([], "a command is required"),
    (["stats"], "invalid choice: 'stats'"),
])
def test_bad_names_and_usage_are_one_line_and_write_nothing(tmp_path, capsys, argv, expected):
    location = tmp_path / "data"
    code, out, err = run(capsys, *argv, *(["--data-location", str(location)] if argv[1:] else []))
    assert code == 2 and out == ""
    assert expected in one_error_line(err)
    assert not location.exists()


def test_unknown_name_in_a_fresh_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtil.data", "prepare", "Flowerz", "--data-location",
                             str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert "(did you mean Flowers?)" in one_error_line(result.stderr)
    assert not (tmp_path / "data").exists()


def test_data_location_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "status", "--data-location", str(tmp_path / "file"))
    assert code == 2 and "is a file, not a folder" in one_error_line(err)


def test_groups_and_aliases():
    assert cli.resolve_names(["MTIL"]) == list(catalog.MTIL_ELEVEN)
    assert cli.resolve_names(["DTD,conceptual_captions", "DTD", "ImageNetSubset:1000"]) == \
        ["DTD", "ConceptualCaptions", "ImageNet"]


# --------------------------------------------------------------------------------------------- prepare
def test_prepare_downloads_through_torchvision_and_verifies(tmp_path, capsys, monkeypatch, downloads, dtd_archive):
    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    downloads.served[DTD_URL_FILE] = dtd_archive
    location = tmp_path / "data"
    code, out, err = run(capsys, "prepare", "DTD", "ToyShape", "--data-location", str(location))
    assert code == 0, err
    assert downloads.log == [(DTD_URL_FILE, "fetched")]
    assert f"DTD: present in {location / 'dtd'} (checked)" in out and "ToyShape: generated in memory" in out
    assert check("DTD", location).state == PRESENT
    assert sorted(p.name for p in location.iterdir()) == ["dtd"]  # the work folder is gone
    code, out, err = run(capsys, "prepare", "DTD", "--data-location", str(location))  # idempotent
    assert code == 0 and "DTD: already present" in out and downloads.log == [(DTD_URL_FILE, "fetched")]


def test_prepare_interrupted_mid_extraction_then_resumed(tmp_path, capsys, monkeypatch, downloads, dtd_archive):
    import torchvision.datasets.utils as tv_utils

    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    downloads.served[DTD_URL_FILE] = dtd_archive
    location = tmp_path / "data"

    def extract_half_then_interrupt(from_path, to_path=None, remove_finished=False):
        with tarfile.open(from_path) as archive:
            members = archive.getmembers()
            archive.extractall(to_path, members=members[: len(members) // 2], filter="data")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tv_utils, "extract_archive", extract_half_then_interrupt)
        code, out, err = run(capsys, "prepare", "DTD", "--data-location", str(location))
    assert code == 130 and "run the same command again to resume" in one_error_line(err)
    work = location / catalog.STAGING / "DTD"
    assert (work / "dtd" / "dtd" / "images").is_dir()  # half extracted ...
    assert check("DTD", location).state == MISSING  # ... but nowhere a run would take it for the dataset
    code, out, err = run(capsys, "status", "DTD", "--data-location", str(location))
    assert "an interrupted prepare left" in out and "prepare DTD" in out

    code, out, err = run(capsys, "prepare", "DTD", "--data-location", str(location))
    assert code == 0, err
    assert downloads.log == [(DTD_URL_FILE, "fetched"), (DTD_URL_FILE, "reused")]  # the archive was kept
    assert check("DTD", location).state == PRESENT
    assert not (location / catalog.STAGING).exists()


def test_prepare_after_a_download_cut_short(tmp_path, capsys, monkeypatch, downloads, dtd_archive):
    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    downloads.served[DTD_URL_FILE] = dtd_archive[: len(dtd_archive) // 2]  # the connection drops halfway
    location = tmp_path / "data"
    code, out, err = run(capsys, "prepare", "DTD", "--data-location", str(location))
    assert code == 2
    line = one_error_line(err)
    assert "DTD: the download or extraction failed" in line and f"put dtd-r1.0.1.tar.gz in {location}/" in line
    assert check("DTD", location).state == MISSING
    downloads.served[DTD_URL_FILE] = dtd_archive  # the md5 check sees the cut file and downloads again
    code, out, err = run(capsys, "prepare", "DTD", "--data-location", str(location))
    assert code == 0, err
    assert downloads.log[-1] == (DTD_URL_FILE, "fetched")
    assert check("DTD", location).state == PRESENT


def test_prepare_uses_an_archive_the_user_downloaded(tmp_path, capsys, monkeypatch, downloads, dtd_archive):
    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    downloads.served[DTD_URL_FILE] = dtd_archive
    location = tmp_path / "data"
    location.mkdir()
    (location / DTD_URL_FILE).write_bytes(dtd_archive)
    code, out, err = run(capsys, "status", "DTD", "--data-location", str(location))
    assert f"found {location / DTD_URL_FILE}: run python -m mtil.data prepare DTD" in out
    code, out, err = run(capsys, "prepare", "DTD", "--data-location", str(location))
    assert code == 0, err
    assert downloads.log == [(DTD_URL_FILE, "reused")]  # not fetched again
    assert check("DTD", location).state == PRESENT
    assert (location / DTD_URL_FILE).read_bytes() == dtd_archive  # the user's file is back where it was


@pytest.mark.parametrize("relative", [False, True])
def test_a_symlinked_download_stays_where_it_was(relative, tmp_path, capsys, monkeypatch, downloads, dtd_archive):
    """Found in review: a download kept as a symbolic link (to a big disk) was moved, then deleted with the work
    folder; a relative link broke when moved."""
    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    downloads.served[DTD_URL_FILE] = dtd_archive
    store = tmp_path / "big"
    store.mkdir()
    (store / DTD_URL_FILE).write_bytes(dtd_archive)
    location = tmp_path / "data"
    location.mkdir()
    link = location / DTD_URL_FILE
    link.symlink_to(Path("..") / "big" / DTD_URL_FILE if relative else store / DTD_URL_FILE)
    code, out, err = run(capsys, "prepare", "DTD", "--data-location", str(location))
    assert code == 0, err
    assert downloads.log == [(DTD_URL_FILE, "reused")]
    assert check("DTD", location).state == PRESENT
    assert link.is_symlink() and link.read_bytes() == dtd_archive  # the link, where it was, still good
    assert (store / DTD_URL_FILE).read_bytes() == dtd_archive


def test_prepare_refuses_damaged_data_in_the_way_before_writing(tmp_path, capsys, monkeypatch, downloads):
    fx.make_dtd(tmp_path, num_classes=3, per_class=2)
    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    (tmp_path / "dtd" / "dtd" / "labels" / "test1.txt").write_text("")
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "prepare", "DTD", "--data-location", str(tmp_path))
    assert code == 2 and f"DTD: {tmp_path / 'dtd'} is damaged (" in one_error_line(err)
    assert downloads.log == [] and snapshot(tmp_path) == before


def _cars_files(tmp_path: Path) -> dict[str, bytes]:
    """The four original Stanford Cars files, made from the fixture layout."""
    source = tmp_path / "cars-source"
    fx.make_stanford_cars(source, num_classes=3, per_class=2)
    base = source / "stanford_cars"
    return {"car_devkit.tgz": tar_gz(base / "devkit", "devkit"),
            "cars_train.tgz": tar_gz(base / "cars_train", "cars_train"),
            "cars_test.tgz": tar_gz(base / "cars_test", "cars_test"),
            "cars_test_annos_withlabels.mat": (base / "cars_test_annos_withlabels.mat").read_bytes()}


def test_prepare_lays_out_stanford_cars_from_the_downloaded_files(tmp_path, capsys, monkeypatch, downloads):
    small(monkeypatch, "StanfordCars", classes=3, train=6, test=6)
    location = tmp_path / "data"
    code, out, err = run(capsys, "prepare", "StanfordCars", "--data-location", str(location))
    assert code == 2 and "StanfordCars: cannot be downloaded automatically" in one_error_line(err)
    assert "car_devkit.tgz, cars_train.tgz, cars_test.tgz, cars_test_annos_withlabels.mat" in err
    assert not location.exists()  # refused before anything was written
    location.mkdir()
    for name, content in _cars_files(tmp_path).items():
        (location / name).write_bytes(content)
    code, out, err = run(capsys, "prepare", "StanfordCars", "--data-location", str(location))
    assert code == 0, err
    assert check("StanfordCars", location).state == PRESENT and downloads.log == []
    assert (location / "car_devkit.tgz").is_file()  # the user's files are left as they were


def test_prepare_conceptual_captions_from_the_official_tsv(tmp_path, capsys):
    from mtil.datasets.sentences import conceptual_captions

    location = tmp_path / "data"
    location.mkdir()
    captions = ['a "quoted" word in a caption', "a dog on a beach", "city street at night , with lights"]
    rows = [f"{caption}\thttp://dead.example/{i}.jpg" for i, caption in enumerate(captions)]
    (location / "Validation_GCC-1.1.0-Validation.tsv").write_text("\n".join(rows) + "\n")
    code, out, err = run(capsys, "prepare", "conceptual_captions", "--data-location", str(location))
    assert code == 0, err
    assert conceptual_captions(location) == captions  # what ZSCL's --ref-sentences conceptual_captions reads
    status = check("ConceptualCaptions", location)
    assert status.state == PRESENT and status.images == {"captions": 3} and "of the official file" in status.detail


def test_prepare_goes_on_after_one_failure(tmp_path, capsys, monkeypatch, downloads, dtd_archive):
    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    downloads.served[DTD_URL_FILE] = dtd_archive
    location = tmp_path / "data"
    code, out, err = run(capsys, "prepare", "ImageNet,DTD", "--data-location", str(location))
    assert code == 2
    assert "ImageNet: cannot be downloaded automatically" in one_error_line(err)
    assert check("DTD", location).state == PRESENT
    shutil.rmtree(location)


def test_prepare_never_installs_what_fails_the_checks(tmp_path, capsys, monkeypatch, downloads):
    source = tmp_path / "source"
    fx.make_dtd(source, num_classes=3, per_class=2)
    first = (source / "dtd" / "dtd" / "labels" / "train1.txt").read_text().split()[0]
    (source / "dtd" / "dtd" / "images" / first).unlink()  # an archive that lacks a listed image
    small(monkeypatch, "DTD", classes=3, train=6, test=6)
    downloads.served[DTD_URL_FILE] = tar_gz(source / "dtd" / "dtd", "dtd")
    location = tmp_path / "data"
    code, out, err = run(capsys, "prepare", "DTD", "--data-location", str(location))
    assert code == 2
    assert "DTD: the prepared files fail the checks (1 listed image files are missing" in one_error_line(err)
    assert not (location / "dtd").exists() and check("DTD", location).state == MISSING


def _tar(members: dict[str, bytes], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _imagenet_archives(tmp_path: Path, wnids: list[str], per_class: int) -> dict[str, bytes]:
    """Miniature ILSVRC2012 train, val and devkit archives, in the formats torchvision.datasets.ImageNet parses."""
    import numpy as np
    from PIL import Image
    from scipy.io import savemat

    def jpeg(label: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), fx.class_color(label, len(wnids))).save(buffer, format="JPEG")
        return buffer.getvalue()

    train = {f"{wnid}.tar": _tar({f"{wnid}_{k}.JPEG": jpeg(i) for k in range(per_class)})
             for i, wnid in enumerate(wnids)}
    val_labels = [i for i in range(len(wnids)) for _ in range(per_class)]
    val = {f"ILSVRC2012_val_{n + 1:08d}.JPEG": jpeg(label) for n, label in enumerate(val_labels)}
    synsets = np.zeros((len(wnids),), dtype=[(f, "O") for f in ("ILSVRC2012_ID", "WNID", "words", "gloss",
                                                              "num_children")])
    for i, wnid in enumerate(wnids):
        synsets[i] = (i + 1, wnid, f"thing {i}, object {i}", "a thing", 0)
    savemat(tmp_path / "meta.mat", {"synsets": synsets})
    devkit = {"ILSVRC2012_devkit_t12/data/meta.mat": (tmp_path / "meta.mat").read_bytes(),
              "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                  "".join(f"{label + 1}\n" for label in val_labels).encode()}
    return {"ILSVRC2012_img_train.tar": _tar(train), "ILSVRC2012_img_val.tar": _tar(val),
            "ILSVRC2012_devkit_t12.tar.gz": _tar(devkit, compress=True)}


def test_prepare_lays_out_imagenet_from_its_three_archives(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.imagenet as tv_imagenet

    monkeypatch.setattr(tv_imagenet, "_verify_archive", lambda root, file, md5: None)  # fixture md5s differ
    small(monkeypatch, "ImageNet", classes=3, train=6, test=6)
    location = tmp_path / "data"
    (location / "ImageNet").mkdir(parents=True)
    archives = _imagenet_archives(tmp_path, ["n01440764", "n01443537", "n01484850"], per_class=2)
    for name, content in archives.items():
        (location / ("ImageNet" if name.endswith(".gz") else "") / name).write_bytes(content)
    code, out, err = run(capsys, "prepare", "ImageNetSubset:100", "--data-location", str(location))
    assert code == 0, err
    status = check("ImageNet", location)
    assert status.state == PRESENT and status.images == {"train": 6, "test": 6}
    assert sorted(p.name for p in (location / "ImageNet" / "val").iterdir()) == ["n01440764", "n01443537",
                                                                                 "n01484850"]
    for name, content in archives.items():  # the user's archives are back where they were
        assert (location / ("ImageNet" if name.endswith(".gz") else "") / name).read_bytes() == content
    assert not (location / catalog.STAGING).exists()
