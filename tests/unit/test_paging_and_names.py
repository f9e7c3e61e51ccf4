"""The shared helpers for list paging and resource names."""

from __future__ import annotations

import pytest

from takeoff_server.errors import InvalidArgument
from takeoff_server.names import ResourcePattern, check_id, is_valid_id
from takeoff_server.pagination import MAX_PAGE_SIZE, next_page_token, page_request, page_size

QUERY = {"parent": "projects/demo", "prefix": "b"}


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
)
def test_misused_or_forged_tokens_are_page_token_invalid(
    token: str, query: dict[str, object], cursor_types: list[type]
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        page_request(page_size_requested=0, page_token=token, query=query, cursor_types=cursor_types)
    assert raised.value.reason == "PAGE_TOKEN_INVALID"
    assert [v.field for v in raised.value.violations] == ["page_token"]


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
