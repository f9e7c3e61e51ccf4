"""The agent tests' stack (registry, queue, builder, agents), every process exporting its spans to an OTLP
receiver in the test: the receiver's settings are in the environment each one starts with."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agent.conftest import (  # noqa: F401
    builder,
    client,
    home,
    lease_ttl_seconds,
    queue_database_url,
    queue_service,
    registry,
    stack,
    start_agent,
)
from tests.observability.collector import Collector, running_collector


@pytest.fixture(scope="module", autouse=True)
def collector() -> Iterator[Collector]:
    """Autouse, so that it starts before the module's services, which inherit its settings."""
    with running_collector() as collector, pytest.MonkeyPatch.context() as patch:
        for name, value in collector.env().items():
            patch.setenv(name, value)
        yield collector
