"""The ray runner's options, as the agent config gives them: each bad one refused by name (no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from takeoff_agent.runners.base import RunnerContext
from takeoff_agent.runners.ray import create


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"address": "http://127.0.0.1:8265", "shared_roots": ["/"], "bogus": 1}, "bogus: not an option"),
        ({"shared_roots": ["/"]}, "address: must be the Ray dashboard's URL"),
        ({"address": "127.0.0.1:8265", "shared_roots": ["/"]}, "address: must be the Ray dashboard's URL"),
        ({"address": "http://127.0.0.1:port", "shared_roots": ["/"]}, "address: must be"),
        ({"address": "http://127.0.0.1:8265"}, "shared_roots: must list the absolute paths"),
        ({"address": "http://127.0.0.1:8265", "shared_roots": ["relative"]}, "shared_roots: must list"),
        ({"address": "http://h:1", "shared_roots": ["/"], "headers": {"X": 1}}, "headers: must map"),
        ({"address": "http://h:1", "shared_roots": ["/"], "poll_seconds": 0}, "poll_seconds: must be"),
        (
            {"address": "http://h:1", "shared_roots": ["/nowhere"]},
            "shared_roots: the agent's state directory",
        ),
    ],
)
def test_a_bad_option_is_refused_by_name(options: dict[str, object], refused: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^" + refused.replace("(", r"\(")):
        create(options, RunnerContext(agent_id="a", state_dir=tmp_path))


def test_good_options_make_a_runner(tmp_path: Path) -> None:
    options = {
        "address": "http://127.0.0.1:8265/",
        "shared_roots": [str(tmp_path)],
        "headers": {"Authorization": "Bearer x"},
        "poll_seconds": 0.5,
    }
    runner = create(options, RunnerContext(agent_id="a", state_dir=tmp_path / "agent"))
    assert (runner.options.address, runner.options.poll_seconds) == ("http://127.0.0.1:8265", 0.5)
    assert (tmp_path / "agent" / "ray-fence.py").exists()  # where the Ray nodes run it from
