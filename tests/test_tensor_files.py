"""Files of tensors mtil writes carry checksums and are read back verified: every kind of damage is named, an
intact file reads back equal (views stay views), and a file written before checksums is checked against its zip
CRCs."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from mtil.archive_check import archive_damage, check_archive
from mtil.tensor_files import (
    CHECKSUM_KEY,
    DamagedFile,
    load_tensors,
    payload_tensors,
    save_tensors,
    tensor_checksum,
)
from tests.damage import KINDS, damage, overwrite_in_place


def _payload() -> dict:
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(300, 257, generator=generator)  # more than one 4 KiB block, and a tail
    return {"format": "test", "step": 7, "model": {"w": big, "view": big[10:20], "b": torch.zeros(3)},
            "half": torch.randn(5, 3, generator=generator).to(torch.bfloat16), "flags": torch.tensor([True, False]),
            "odd": torch.arange(13, dtype=torch.uint8), "scalar": torch.tensor(2.5), "empty": torch.zeros(0),
            "nested": [torch.ones(2), (torch.full((1,), 3.0), "text")]}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_an_intact_file_reads_back_equal_with_views_kept(tmp_path):
    path = tmp_path / "f.pth"
    save_tensors(_payload(), path)
    back = load_tensors(path)
    assert _equal(back, _payload()) and CHECKSUM_KEY not in back
    assert back["model"]["view"].untyped_storage().data_ptr() == back["model"]["w"].untyped_storage().data_ptr()
    back["model"]["w"][10, 0] = 99.0  # in memory, not a read-only mapping of the file
    assert back["model"]["view"][0, 0] == 99.0


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_damage_is_named(kind, tmp_path):
    path = tmp_path / "f.pth"
    save_tensors(_payload(), path)
    damage(path, kind)
    with pytest.raises(DamagedFile, match=f"checkpoint {path} is damaged"):
        load_tensors(path, "checkpoint")


def test_overwritten_tensor_bytes_load_in_torch_but_are_caught_and_named(tmp_path):
    path = tmp_path / "f.pth"
    save_tensors(_payload(), path)
    overwrite_in_place(path, nbytes=64)  # 16 floats inside the largest storage: model/w
    torch.load(path, weights_only=True)  # what torch.load alone makes of it: nothing
    with pytest.raises(DamagedFile, match="tensor model/w does not match its checksum"):
        load_tensors(path)


def test_a_file_without_checksums_is_checked_against_its_zip_crcs(tmp_path):
    path = tmp_path / "old.pth"
    torch.save(_payload(), path)  # as mtil wrote files before checksums
    assert _equal(load_tensors(path), _payload())
    overwrite_in_place(path, nbytes=8)
    with pytest.raises(DamagedFile, match="fails its CRC"):
        load_tensors(path)


def test_the_checksum_sees_a_changed_word_a_moved_block_and_not_the_thread_count():
    data = torch.randn(4096)  # 16 KiB: four blocks
    base = tensor_checksum(data)
    changed = data.clone()
    changed[1000] = changed[1000] + 1
    assert tensor_checksum(changed)[1] != base[1]
    swapped = data.clone().view(4, 1024)[[1, 0, 2, 3]].reshape(-1)  # two 4 KiB blocks exchanged: same sum
    assert tensor_checksum(swapped)[1] == base[1] and tensor_checksum(swapped)[2] != base[2]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert tensor_checksum(data) == base
    finally:
        torch.set_num_threads(threads)
    assert tensor_checksum(data.to(torch.float64)[:0]) == (0, 0, 0)


def test_payload_tensors_walks_in_save_order():
    names = [name for name, _ in payload_tensors(_payload())]
    assert names[:3] == ["model/w", "model/view", "model/b"] and names[-2:] == ["nested/0", "nested/1/0"]


def test_archive_check_reports_each_failure(tmp_path):
    path = tmp_path / "f.pth"
    torch.save({"w": torch.randn(64, 1024)}, path)
    assert archive_damage(path) is None and check_archive(path).records > 1
    overwrite_in_place(path)
    assert "fails its CRC" in archive_damage(path)
    path.write_bytes(path.read_bytes()[:100])
    assert "not a complete zip archive" in archive_damage(path)
    unchecked = tmp_path / "nocrc.zip"  # a writer that records no CRCs: reported unchecked, not damaged
    with zipfile.ZipFile(unchecked, "w") as archive:
        archive.writestr("a/data.pkl", b"x" * 10)
    raw = bytearray(unchecked.read_bytes())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    raw[local + 14:local + 18] = raw[central + 16:central + 20] = bytes(4)
    unchecked.write_bytes(bytes(raw))
    assert check_archive(unchecked).damage is None and not check_archive(unchecked).checked

