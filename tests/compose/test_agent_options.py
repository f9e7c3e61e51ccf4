"""The local-container runner's ``registry_socket_volume``: how an agent in a container (docker-compose.yml's)
gives its jobs the registry's socket. The compose suite runs it for real; these check the option itself."""

from __future__ import annotations

import pytest

from takeoff_agent.runners.container import parse_options


def test_the_registry_socket_volume_is_a_volume_name() -> None:
    options = parse_options({"registry_socket_volume": "takeoff-registry-socket"})

    assert options.registry_socket_volume == "takeoff-registry-socket"


@pytest.mark.parametrize("volume", ["/var/lib/docker/volumes/x", "", "a volume", 3])
def test_anything_but_a_volume_name_is_refused(volume: object) -> None:
    with pytest.raises(ValueError, match="registry_socket_volume must be the name of a Docker volume"):
        parse_options({"registry_socket_volume": volume})
