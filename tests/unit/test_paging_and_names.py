"""The shared helpers for list paging and resource names."""

from __future__ import annotations

import base64
import contextvars
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf import struct_pb2

from takeoff_server.call_context import method_var
from takeoff_server.errors import InvalidArgument
from takeoff_server.names import ResourcePattern, check_id, is_valid_id
from takeoff_server.pagination import (
    MAX_PAGE_BYTES,
    MAX_PAGE_SIZE,
    Cursor,
    PageRequest,
    load_signing_key,
    next_page_token,
    page_request,
    page_response,
    page_size,
    use_signing_key,
)

QUERY = {"parent": "projects/demo", "prefix": "b"}

T = TypeVar("T")


def test_page_sizes_default_cap_and_refuse_negatives() -> None:
    assert page_size(0) == 50
    assert page_size(7) == 7
    assert page_size(5000) == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument) as raised:
        page_size(-1)
    assert (raised.value.reason, [v.field for v in raised.value.violations]) == (
        "ARGUMENT_INVALID",
        ["page_size"],
    )


def test_a_token_continues_its_own_query_with_any_page_size() -> None:
    token = next_page_token(QUERY, ("b-2", 17))

    page = page_request(page_size_requested=3, page_token=token, query=dict(QUERY), cursor_types=[str, int])

    assert (page.size, page.after) == (3, ("b-2", 17))
    assert page_request(page_size_requested=0, page_token="", query=QUERY, cursor_types=[str]).after is None


@pytest.mark.parametrize(
    ("token", "query", "cursor_types"),
    [
        (next_page_token(QUERY, ("b-2",)), {**QUERY, "prefix": "c"}, [str]),  # another query
        (next_page_token(QUERY, ("b-2",)), QUERY, [int]),  # a cursor of another shape
        (next_page_token(QUERY, (True,)), QUERY, [int]),  # bool is not an int here
        ("%%%", QUERY, [str]),
        ("bm90IGpzb24", QUERY, [str]),  # base64 of "not json"
        ("WzFd", QUERY, [str]),  # base64 of "[1]"
    ],
    # Issued tokens carry a signature by a key made per process: named by case, the ids stay the same.
    ids=["another-query", "another-cursor-shape", "bool-for-int", "not-base64", "not-json", "no-signature"],
)
def test_misused_or_forged_tokens_are_page_token_invalid(
    token: str, query: dict[str, object], cursor_types: list[type]
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        page_request(page_size_requested=0, page_token=token, query=query, cursor_types=cursor_types)
    assert raised.value.reason == "PAGE_TOKEN_INVALID"
    assert [v.field for v in raised.value.violations] == ["page_token"]


def _edited(token: str, cursor: list[object]) -> str:
    """``token`` with its cursor replaced and its signature kept, as a client editing it would."""
    _, _, signature = token.partition(".")
    encoded = base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode().rstrip("=")
    return f"{encoded}.{signature}"


def _in_method(method: str, call: Callable[[], T]) -> T:
    """``call()`` as if it ran while serving ``method``."""
    context = contextvars.copy_context()
    context.run(method_var.set, method)
    return context.run(call)


def _continue(token: str) -> PageRequest:
    return page_request(page_size_requested=0, page_token=token, query=QUERY, cursor_types=[str])


def _refused(token: str, *, cursor_types: list[type] | None = None) -> str:
    with pytest.raises(InvalidArgument) as raised:
        page_request(page_size_requested=0, page_token=token, query=QUERY, cursor_types=cursor_types or [str])
    assert [v.field for v in raised.value.violations] == ["page_token"]
    return raised.value.reason


def test_an_edited_cursor_is_page_token_invalid() -> None:
    token = next_page_token(QUERY, ("b-2",))

    assert _refused(_edited(token, ["a"])) == "PAGE_TOKEN_INVALID"
    assert _refused(_edited(token, [2**80]), cursor_types=[int]) == "PAGE_TOKEN_INVALID"
    assert _refused(token + "A") == "PAGE_TOKEN_INVALID"


def test_a_token_continues_only_the_method_that_issued_it() -> None:
    token = _in_method("/takeoff.v1.JobService/ListJobs", lambda: next_page_token(QUERY, ("b-2",)))

    assert _in_method("/takeoff.v1.JobService/ListJobs", lambda: _continue(token)).after == ("b-2",)
    with pytest.raises(InvalidArgument) as raised:
        _in_method("/takeoff.v1.QueueService/ListQueues", lambda: _continue(token))
    assert raised.value.reason == "PAGE_TOKEN_INVALID"


def test_the_signing_key_is_kept_so_tokens_survive_a_restart(tmp_path: Path) -> None:
    key_file = tmp_path / "home" / "page-token.key"
    key = load_signing_key(key_file)
    assert load_signing_key(key_file) == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert list(key_file.parent.iterdir()) == [key_file]

    use_signing_key(key)
    token = next_page_token(QUERY, ("b-2",))
    use_signing_key(load_signing_key(tmp_path / "other.key"))  # another server's key
    assert _refused(token) == "PAGE_TOKEN_INVALID"
    use_signing_key(load_signing_key(key_file))  # the first server again, restarted
    assert _continue(token).after == ("b-2",)


def _items(*sizes: int) -> list[tuple[struct_pb2.Value, Cursor]]:
    """Protos of about these encoded sizes, each with its cursor."""
    return [(struct_pb2.Value(string_value="x" * size), (f"id-{n}",)) for n, size in enumerate(sizes)]


def test_a_page_that_fits_is_sent_whole() -> None:
    items = _items(10, 10, 10)

    assert page_response(items, more=False, query=QUERY) == ([item for item, _ in items], "")
    shown, token = page_response(items, more=True, query=QUERY)
    assert len(shown) == 3
    assert _continue(token).after == ("id-2",)


def test_a_page_ends_early_rather_than_outgrow_the_receive_limit() -> None:
    third = MAX_PAGE_BYTES // 3
    items = _items(third, third, third, third)

    shown, token = page_response(items, more=False, query=QUERY)

    assert len(shown) == 2
    assert sum(item.ByteSize() for item in shown) <= MAX_PAGE_BYTES
    assert _continue(token).after == ("id-1",)


def test_one_item_is_sent_even_when_it_alone_is_over_the_page_budget() -> None:
    shown, token = page_response(_items(MAX_PAGE_BYTES + 1, 1), more=False, query=QUERY)

    assert len(shown) == 1
    assert _continue(token).after == ("id-0",)


@pytest.mark.parametrize("value", ["a", "train-mnist", "0", "a_b", "x" * 63])
def test_valid_ids(value: str) -> None:
    assert is_valid_id(value)
    assert check_id(value, field="job_id") == value


@pytest.mark.parametrize("value", ["", "-a", "_a", "A", "a.b", "a b", "x" * 64, "é"])
def test_invalid_ids_name_the_field(value: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_id(value, field="job_id")
    assert raised.value.reason == "NAME_INVALID"
    assert [v.field for v in raised.value.violations] == ["job_id"]


def test_resource_patterns_parse_format_and_refuse() -> None:
    version = ResourcePattern("projects/{project}/jobs/{job}/versions/{n}", n=r"0|[1-9][0-9]*")

    assert version.parse("projects/p/jobs/j/versions/12", field="name") == {
        "project": "p",
        "job": "j",
        "n": "12",
    }
    assert version.format(project="p", job="j", n=3) == "projects/p/jobs/j/versions/3"
    for name in ("projects/p/jobs/j/versions/012", "projects/p/jobs/j", "projects/P/jobs/j/versions/1", ""):
        assert version.match(name) is None
        with pytest.raises(InvalidArgument) as raised:
            version.parse(name, field="name")
        assert (raised.value.reason, [v.field for v in raised.value.violations]) == ("NAME_INVALID", ["name"])
