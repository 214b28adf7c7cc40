"""File helpers: a full disk is reported as such, with the path; locks go with their process."""

import errno
import shutil
from collections import namedtuple

import pytest

from mbphot import io
from mbphot.io import atomic_path, write_json


def test_a_full_disk_is_named_with_the_path(tmp_path):
    target = tmp_path / "photometry.parquet"
    with pytest.raises(OSError) as error:
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert error.value.errno == errno.ENOSPC
    assert str(error.value).startswith(f"[Errno 28] disk full: cannot write {target}")
    assert list(tmp_path.iterdir()) == [], "nothing half-written is left"


def test_a_short_write_on_a_nearly_full_disk_is_a_full_disk(tmp_path, monkeypatch):
    """Some writers report only '212521 requested and 100656 written'."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OSError, match="disk full: cannot write .*catalog.json .*212521 requested and 100656 written"):
        with atomic_path(tmp_path / "catalog.json"):
            raise OSError("212521 requested and 100656 written")


def test_other_write_errors_are_left_as_they_are(tmp_path):
    with pytest.raises(OSError, match="^boom$"):
        with atomic_path(tmp_path / "x.json"):
            raise OSError("boom")
    assert io.FULL_DISK_BYTES < shutil.disk_usage(tmp_path).free  # this disk is not full
    assert write_json(tmp_path / "x.json", {"a": 1}).read_text() == '{\n  "a": 1\n}\n'
