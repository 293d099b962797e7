"""Backend URI parsing."""

from __future__ import annotations

import pytest

from services.common.backends.uri import DirURI, ZdbURI, parse_uri
from services.common.errors import InvalidURI


def test_dir_uris() -> None:
    assert parse_uri("dir:///var/lib/gridstor/b01") == DirURI("/var/lib/gridstor/b01")
    assert parse_uri("dir://data/b01") == DirURI("data/b01")


def test_zdb_uris() -> None:
    u = parse_uri("zdb://:s%40cret@10.1.2.3:9900/shards01")
    assert u == ZdbURI("10.1.2.3", 9900, "shards01", "s@cret")
    assert isinstance(u, ZdbURI)
    assert "s@cret" not in u.redacted and "s@cret" not in repr(u)
    assert u.redacted == "zdb://:***@10.1.2.3:9900/shards01"
    v = parse_uri("zdb://[::1]:9900/meta")
    assert isinstance(v, ZdbURI) and v.host == "::1" and v.password is None
    assert v.redacted == "zdb://[::1]:9900/meta"


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("", "empty"),
        ("/plain/path", "no scheme"),
        ("s3://bucket/x", "unknown scheme"),
        ("dir://", "names no folder"),
        ("zdb://host/ns", "no port"),
        ("zdb://host:99999/ns", "out of range"),
        ("zdb://host:abc/ns", "Port could not be cast"),
        ("zdb://host:9900", "no namespace"),
        ("zdb://host:9900/", "no namespace"),
        ("zdb://host:9900/default", "default"),
        ("zdb://host:9900/a/b", "namespace"),
        ("zdb://user:pw@host:9900/ns", "no user names"),
        ("zdb://host:9900/ns?x=1", "query"),
        ("zdb://:9900/ns", "no host"),
    ],
)
def test_bad_uris(uri: str, why: str) -> None:
    with pytest.raises(InvalidURI, match=why):
        parse_uri(uri)


def test_password_never_in_error() -> None:
    with pytest.raises(InvalidURI) as exc:
        parse_uri("zdb://:topsecret@host/ns")
    assert "topsecret" not in str(exc.value)
