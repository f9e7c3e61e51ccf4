"""A failure message fits what the queue keeps (queue.proto: a Complete's last 4 KiB) with its explanation."""

from __future__ import annotations

from takeoff_agent.work import MAX_OUTCOME_MESSAGE_BYTES, failure_message


def test_the_explanation_and_the_newest_lines_that_fit_are_kept() -> None:
    lines = [f"line {n} " + "é" * 300 for n in range(40)]

    message = failure_message("build failed: no matching distribution for torch==0.0", lines)

    assert len(message.encode()) <= MAX_OUTCOME_MESSAGE_BYTES
    first, *kept = message.split("\n")
    assert first == "build failed: no matching distribution for torch==0.0"
    assert kept == lines[-len(kept) :]
    assert 0 < len(kept) < len(lines)


def test_one_line_longer_than_the_limit_is_clipped_on_a_character_boundary() -> None:
    message = failure_message("exit code 1; last lines:", ["€" * 5000])

    assert len(message.encode()) <= MAX_OUTCOME_MESSAGE_BYTES
    assert message.startswith("exit code 1; last lines:\n€")
    assert set(message.split("\n")[1]) == {"€"}


def test_a_short_message_is_unchanged() -> None:
    assert failure_message("exit code 2; last lines:", ["a", "b"]) == "exit code 2; last lines:\na\nb"
