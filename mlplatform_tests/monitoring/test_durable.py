"""Durable writes: a file is replaced whole or not at all, a claimed name is never overwritten,
and nothing temporary is left behind. Real files in a temporary directory."""

import pytest

from mlplatform.monitoring.durable import write_atomically, write_new


def test_write_atomically_replaces_the_whole_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "nested" / "window.json"

    assert write_atomically(path, b'{"rows": 1}') == path
    write_atomically(path, b'{"rows": 22}')

    assert path.read_bytes() == b'{"rows": 22}'
    assert [p.name for p in path.parent.iterdir()] == ["window.json"]


def test_a_failed_write_keeps_the_previous_file_and_cleans_up(tmp_path):
    path = tmp_path / "reference.bin"
    write_atomically(path, b"complete profile")

    with pytest.raises(TypeError):
        write_atomically(path, "not bytes")  # fails while writing the temporary file

    assert path.read_bytes() == b"complete profile"
    assert [p.name for p in tmp_path.iterdir()] == ["reference.bin"]


def test_write_new_never_overwrites_a_claimed_name(tmp_path):
    written = [
        write_new(tmp_path, "20260101T000000Z-r", ".bin", f"part {i}".encode()) for i in range(3)
    ]

    assert [p.name for p in written] == [
        "20260101T000000Z-r.bin",
        "20260101T000000Z-r-1.bin",
        "20260101T000000Z-r-2.bin",
    ]
    assert [p.read_bytes() for p in written] == [b"part 0", b"part 1", b"part 2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
