"""Random ids drawn a page of system randomness at a time (takeoff_server/random_ids.py): of the length
asked, hex, never repeated, across pages; bits within their range; and a forked child never draws the ids
its parent will."""

from __future__ import annotations

import os

from takeoff_server.random_ids import random_bits, random_hex


def test_ids_are_hex_of_the_length_asked_and_differ_across_pages() -> None:
    drawn = [random_hex(digits) for digits in (20, 32, 16, 7) for _ in range(300)]  # several pages' worth
    assert all(len(value) in (20, 32, 16, 7) for value in drawn)
    assert all(int(value, 16) >= 0 for value in drawn)
    assert len({value for value in drawn if len(value) == 32}) == 300


def test_random_bits_cover_their_range_and_no_more() -> None:
    drawn = {random_bits(3) for _ in range(2000)}
    assert drawn == set(range(8))
    assert all(0 <= random_bits(20) < 2**20 for _ in range(2000))


def test_a_forked_child_draws_from_a_page_of_its_own() -> None:
    random_hex(32)  # the parent holds a page with bytes left
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's side
        os.write(writing, random_hex(32).encode())
        os._exit(0)
    os.close(writing)
    os.waitpid(child, 0)
    with os.fdopen(reading) as pipe:
        childs = pipe.read()
    assert len(childs) == 32
    assert childs != random_hex(32)  # what the parent draws next, from the page the child had copied
