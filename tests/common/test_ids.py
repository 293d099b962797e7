"""File id grammar: parse, format, validate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import InvalidFileId, InvalidInput
from services.common.ids import FileId, dropped_ext, ext_from_name, parse_file_id

HASH = bytes(range(24))
ext_part = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
exts = st.one_of(st.just(""), st.lists(ext_part, min_size=1, max_size=3).map(lambda ps: "." + ".".join(ps)))


@given(h=st.binary(min_size=24, max_size=24), mid=st.integers(0, 0xFFFFFFFF), ext=exts)
def test_format_parse_round_trip(h: bytes, mid: int, ext: str) -> None:
    fid = FileId(h, mid, ext)
    text = str(fid)
    assert len(fid.key) == 56
    assert text == h.hex() + f"{mid:08x}" + ext
    assert parse_file_id(text) == fid


def test_meta_id_is_value_in_hex() -> None:
    fid = parse_file_id(HASH.hex() + "0000002a.tar.gz")
    assert fid.meta_id == 42
    assert fid.ext == ".tar.gz"
    assert fid.hash == HASH


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("abc", "56 hex"),
        (HASH.hex() + "0000002", "56 hex"),
        (HASH.hex() + "0000002a0", "56 hex"),
        (HASH.hex().upper() + "0000002A", "lowercase hex"),
        ("g" * 56, "lowercase hex"),
        (HASH.hex() + "0000002a.", "extension"),
        (HASH.hex() + "0000002a.JPG", "extension"),
        (HASH.hex() + "0000002a.a.b.c.d", "extension"),
        (HASH.hex() + "0000002a.tar..gz", "extension"),
        (HASH.hex() + "0000002a.j/pg", "extension"),
        (HASH.hex() + "0000002a." + "x" * 17, "extension"),
        (HASH.hex() + "0000002a/../../etc", "56 hex"),
        (HASH.hex() + "0000002a" + "." + "a" * 200, "characters"),
    ],
)
def test_malformed_ids_are_refused_with_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidFileId, match=why):
        parse_file_id(text)


def test_non_string_refused() -> None:
    with pytest.raises(InvalidFileId):
        parse_file_id(b"abc")  # type: ignore[arg-type]


@given(st.text(max_size=120))
def test_parse_never_crashes(text: str) -> None:
    try:
        fid = parse_file_id(text)
    except InvalidFileId:
        return
    assert str(fid) == text


def test_fileid_validates_fields() -> None:
    with pytest.raises(InvalidFileId):
        FileId(b"short", 1)
    with pytest.raises(InvalidFileId):
        FileId(HASH, 1 << 32)
    with pytest.raises(InvalidInput):
        FileId(HASH, 1, ".BAD")


@pytest.mark.parametrize(
    ("name", "ext"),
    [
        ("photo.JPG", ".jpg"),
        ("backup.tar.gz", ".tar.gz"),
        ("README", ""),
        (".jpg", ".jpg"),
        ("dir/sub.d/file.png", ".png"),
        ("my.holiday photos.zip", ".zip"),
        ("weird.ünïcode", ""),
        ("C:\\x\\y.Pdf", ".pdf"),
        ("a.b.c.d.e", ".c.d.e"),
    ],
)
def test_ext_from_name(name: str, ext: str) -> None:
    assert ext_from_name(name) == ext


@given(st.text(max_size=80))
def test_ext_from_name_always_valid(name: str) -> None:
    ext = ext_from_name(name)
    if ext:
        parse_file_id("0" * 56 + ext)


@pytest.mark.parametrize(
    ("name", "dropped"),
    [
        ("y.t@r", ".t@r"),
        ("a." + "x" * 100, ".xxxx"),
        ("photo.jpg", ""),
        ("README", ""),
        ("file.", ""),
        ("a.b c.zip", ""),
    ],
)
def test_dropped_ext_says_why_only_when_the_last_part_cannot_be_kept(name: str, dropped: str) -> None:
    note = dropped_ext(name)
    assert bool(note) == bool(dropped)
    if dropped:
        assert dropped in note and "stored without one" in note and not ext_from_name(name)
