"""The HTTP answers of a REST download (services/meta/web.py), function by function."""

from __future__ import annotations

import pytest

from services.meta.web import Answer, Request, byte_range, error_body, etag, etags, evaluate, http_date, parse_http_date

SIZE = 1000
TAG = etag("ab" * 28)
MODIFIED = 1_700_000_000  # Tue, 14 Nov 2023 22:13:20 GMT


def req(method: str = "GET", **headers: str) -> Request:
    return Request(method, {k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes=0-99", (0, 100)),
        ("bytes=990-", (990, SIZE)),
        ("bytes=-10", (990, SIZE)),
        ("bytes=-5000", (0, SIZE)),
        ("bytes=500-5000", (500, SIZE)),
        ("bytes=999-999", (999, SIZE)),
        ("Bytes = 1 - 2", (1, 3)),  # unit case-insensitive, spaces tolerated
        ("bytes=5-1", None),  # invalid: ignored
        ("bytes=0-1,4-5", None),  # several: the whole file
        ("bytes=-", None),
        ("items=0-1", None),
        ("bytes=a-b", None),
    ],
)
def test_byte_range_forms(value: str, expected: tuple[int, int] | None) -> None:
    assert byte_range(value, SIZE) == expected


@pytest.mark.parametrize("value", ["bytes=1000-", "bytes=2000-3000", "bytes=-0"])
def test_unsatisfiable_ranges_say_why(value: str) -> None:
    why = byte_range(value, SIZE)
    assert isinstance(why, str) and value.removeprefix("bytes=") in why


def test_an_empty_file_ignores_ranges() -> None:
    assert byte_range("bytes=0-", 0) is None
    assert evaluate(req(range="bytes=0-"), 0, TAG, MODIFIED) == Answer(200, 0, 0)


def test_http_dates_in_all_three_forms() -> None:
    assert http_date(MODIFIED) == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert parse_http_date("Tue, 14 Nov 2023 22:13:20 GMT") == MODIFIED
    assert parse_http_date("Tuesday, 14-Nov-23 22:13:20 GMT") == MODIFIED  # RFC 850
    assert parse_http_date("Tue Nov 14 22:13:20 2023") == MODIFIED  # asctime
    for bad in ("", "yesterday", "Tue, 14 Nov 2023", "1700000000"):
        assert parse_http_date(bad) is None, bad


def test_entity_tag_lists() -> None:
    assert etags("*") == []
    assert etags('"a", W/"b" ,"c"') == [(False, '"a"'), (True, '"b"'), (False, '"c"')]
    assert etags("a") is None and etags('"a" junk') is None and etags("") is None


def test_metadata_gives_the_request_only_through_the_transcoder() -> None:
    assert Request.from_metadata([("range", "bytes=0-1"), ("user-agent", "grpc")]) is None  # a gRPC client
    got = Request.from_metadata(
        [
            ("x-envoy-original-method", "HEAD"),  # a client's, passed on: the transcoder's comes last
            ("range", "bytes=0-1"),
            ("if-none-match", '"a"'),
            ("if-none-match", '"b"'),
            ("x-envoy-original-method", "GET"),
            ("if-match-bin", b"\x00"),
            ("if-range", "x" * 5000),  # too long: not parsed
        ]
    )
    assert got == Request("GET", {"range": "bytes=0-1", "if-none-match": '"a", "b"'})


def test_conditions_in_rfc_9110_order() -> None:
    past, future = http_date(MODIFIED - 10), http_date(MODIFIED + 10)
    assert evaluate(req(), SIZE, TAG, MODIFIED) == Answer(200, 0, SIZE)
    assert evaluate(req(if_none_match=TAG), SIZE, TAG, MODIFIED).status == 304
    assert evaluate(req(if_none_match=f"W/{TAG}"), SIZE, TAG, MODIFIED).status == 304  # weak comparison
    assert evaluate(req("HEAD", if_none_match="*"), SIZE, TAG, MODIFIED).status == 304
    assert evaluate(req(if_modified_since=future), SIZE, TAG, MODIFIED).status == 304
    assert evaluate(req(if_modified_since=http_date(MODIFIED)), SIZE, TAG, MODIFIED).status == 304
    assert evaluate(req(if_modified_since=past), SIZE, TAG, MODIFIED).status == 200
    # If-None-Match present: If-Modified-Since is not looked at.
    assert evaluate(req(if_none_match='"x"', if_modified_since=future), SIZE, TAG, MODIFIED).status == 200
    # If-Match (strong) before everything; If-Unmodified-Since only without it.
    assert evaluate(req(if_match=f"W/{TAG}"), SIZE, TAG, MODIFIED).status == 412
    assert evaluate(req(if_match=TAG, if_none_match=TAG), SIZE, TAG, MODIFIED).status == 304
    assert evaluate(req(if_unmodified_since=past), SIZE, TAG, MODIFIED).status == 412
    assert evaluate(req(if_match="*", if_unmodified_since=past), SIZE, TAG, MODIFIED).status == 200
    assert evaluate(req(if_unmodified_since="garbage"), SIZE, TAG, MODIFIED).status == 200


def test_range_and_if_range() -> None:
    assert evaluate(req(range="bytes=10-19"), SIZE, TAG, MODIFIED) == Answer(206, 10, 20)
    assert evaluate(req("HEAD", range="bytes=10-19"), SIZE, TAG, MODIFIED) == Answer(200, 0, SIZE)  # GET only
    assert evaluate(req(range="bytes=10-19", if_range=TAG), SIZE, TAG, MODIFIED).status == 206
    assert evaluate(req(range="bytes=10-19", if_range=f"W/{TAG}"), SIZE, TAG, MODIFIED).status == 200
    assert evaluate(req(range="bytes=10-19", if_range='"other"'), SIZE, TAG, MODIFIED).status == 200
    assert evaluate(req(range="bytes=10-19", if_range=http_date(MODIFIED)), SIZE, TAG, MODIFIED).status == 206
    assert evaluate(req(range="bytes=10-19", if_range=http_date(MODIFIED + 1)), SIZE, TAG, MODIFIED).status == 200
    late = evaluate(req(range="bytes=2000-"), SIZE, TAG, MODIFIED)
    assert late.status == 416 and b'{"code":11,' in error_body(late)
    # The query's part stays for a 200; a Range header selects within the whole file.
    assert evaluate(req(), SIZE, TAG, MODIFIED, 100, 200) == Answer(200, 100, 200)


def test_the_status_hint_is_the_one_the_edge_applies() -> None:
    from services.common.rpc import HTTP_STATUS_TRAILER
    from services.meta.web import STATUS_HEADER

    assert STATUS_HEADER == HTTP_STATUS_TRAILER  # web.py imports no grpc, so it names the header itself
