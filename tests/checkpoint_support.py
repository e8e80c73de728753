"""Damage a checkpoint file the way bit rot does: bytes flipped inside the stored tensor data,
where ``torch.load`` (torch 2.2 checks no CRC) would load wrong weights without an error."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import torch


def flip_tensor_bytes(path: Path, count: int = 64) -> str:
    """Flip ``count`` bytes in the middle of the largest record of a ``torch.save`` file;
    check that torch still loads it (silently wrong) and return the record's name."""
    with zipfile.ZipFile(path) as archive:
        storages = [i for i in archive.infolist() if "/data/" in i.filename]  # tensor bytes
        info = max(storages, key=lambda i: i.file_size)
    data = bytearray(Path(path).read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len  # the record's stored bytes
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size > 2 * count, info
    middle = start + info.file_size // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    torch.load(path, map_location="cpu", weights_only=True)  # no error: the damage is silent
    return info.filename
