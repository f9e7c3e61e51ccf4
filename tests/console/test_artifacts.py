"""Artifacts and resumed runs in the console, against a real registry: lineage on both runs' pages, the
artifact pages, a file downloaded through the console, the permission a key lacks, and a resumed run's
chart data as one segment per attempt.

Seeded as an item's two attempts would leave them: attempt 1 logs steps 0-4 and the checkpoint ``ckpt:v0``,
then crashes; attempt 2 (``resumed_from`` attempt 1) uses ``ckpt:latest``, logs steps 5-9 and ``ckpt:v1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest

from takeoff.v1 import (
    artifacts_pb2,
    artifacts_pb2_grpc,
    common_pb2,
    keys_pb2,
    keys_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
)
from takeoff_rpc.channels import open_channel
from tests.console.conftest import PROJECT, QUEUE, Console, console_process, project_key
from tests.console.test_live import events
from tests.console.test_security import signed_in
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess

CHUNK = 1024 * 1024
WEIGHTS = secrets.token_bytes(2 * CHUNK + 12345)
"""Larger than two of the registry's chunks, so a download is relayed in several pieces."""
NOTES_PATH = "logs/notes été.txt"
NOTES = b"a file whose name needs quoting\n"


@dataclass(frozen=True)
class Seeded:
    first: str
    """Attempt 1's run id."""
    second: str
    """Attempt 2's run id, resumed from the first."""
    v0: str
    """``projects/console/artifactCollections/{ckpt}/versions/0``."""
    artifact: str
    """The checkpoint artifact's id (new per test session)."""


def _log_artifact(
    stub: artifacts_pb2_grpc.ArtifactServiceStub, artifact: str, run: str, files: dict[str, bytes]
) -> artifacts_pb2.ArtifactVersion:
    entries = [
        artifacts_pb2.ArtifactFile(path=path, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        for path, data in sorted(files.items())
    ]
    header = artifacts_pb2.ArtifactVersionHeader(
        parent=f"projects/{PROJECT}",
        artifact=artifact,
        type="checkpoint",
        run=run,
        files=entries,
        uploads=[entry.sha256 for entry in entries],
    )
    header.metadata.update({"epoch": 3, "note": "<b>not markup</b>"})

    def parts() -> Iterator[artifacts_pb2.CreateArtifactVersionRequest]:
        yield artifacts_pb2.CreateArtifactVersionRequest(header=header)
        for _, data in sorted(files.items()):
            for start in range(0, len(data), CHUNK):
                yield artifacts_pb2.CreateArtifactVersionRequest(chunk=data[start : start + CHUNK])

    return stub.CreateArtifactVersion(parts(), timeout=60).version


def _attempt(runs: runs_pb2_grpc.RunServiceStub, item: str, attempt: int, steps: range) -> runs_pb2.Run:
    created = runs.CreateRun(
        runs_pb2.CreateRunRequest(
            parent=f"projects/{PROJECT}", run=runs_pb2.Run(queue_item=item, attempt=attempt)
        ),
        timeout=30,
    ).run
    # Attached, as its job's takeoff.init() does: only an attempt whose job started is resumed from.
    runs.AttachRun(runs_pb2.AttachRunRequest(name=created.name), timeout=30)
    rows = [runs_pb2.MetricRow(step=step, values={"loss": 10.0 - step}) for step in steps]
    runs.BatchLogMetrics(runs_pb2.BatchLogMetricsRequest(name=created.name, rows=rows), timeout=30)
    return created


@pytest.fixture(scope="module")
def seeded(console: Console) -> Seeded:
    artifact = f"ckpt-{secrets.token_hex(4)}"
    item = f"{QUEUE}/items/resumed-{secrets.token_hex(4)}"
    with open_channel(console.registry, api_key=ADMIN_KEY) as channel:
        runs = runs_pb2_grpc.RunServiceStub(channel)
        stub = artifacts_pb2_grpc.ArtifactServiceStub(channel)
        first = _attempt(runs, item, 1, range(5))
        v0 = _log_artifact(stub, artifact, first.name, {"weights.bin": WEIGHTS, NOTES_PATH: NOTES})
        runs.FinishRun(
            runs_pb2.FinishRunRequest(name=first.name, state=common_pb2.RUN_STATE_CRASHED), timeout=30
        )
        second = _attempt(runs, item, 2, range(5, 10))
        assert second.resumed_from == first.name
        stub.UseArtifactVersion(
            artifacts_pb2.UseArtifactVersionRequest(
                name=f"{artifact}:latest", project=f"projects/{PROJECT}", run=second.name
            ),
            timeout=30,
        )
        _log_artifact(stub, artifact, second.name, {"weights.bin": WEIGHTS[::-1]})
        runs.FinishRun(
            runs_pb2.FinishRunRequest(name=second.name, state=common_pb2.RUN_STATE_FINISHED), timeout=30
        )
    return Seeded(first.name.rpartition("/")[2], second.name.rpartition("/")[2], v0.name, artifact)


def _found(pattern: str, page: str) -> str:
    """The first group of ``pattern``'s first match in ``page`` (it must match)."""
    found = re.search(pattern, page, re.S)
    assert found, f"{pattern} is not on the page"
    return found.group(1)


def _table(page: str, testid: str) -> str:
    return _found(rf'<table data-testid="{testid}">(.*?)</table>', page)


def _versions(table: str) -> list[str]:
    return re.findall(r'data-testid="artifact-version-row" data-version="([^"]+)"', table)


def test_a_run_page_shows_what_the_run_logged_and_used_and_the_attempt_it_resumed(
    console: Console, seeded: Seeded
) -> None:
    browser = signed_in(console, ADMIN_KEY)
    second = browser.get(f"/projects/{PROJECT}/runs/{seeded.second}")
    assert second.status_code == 200, second.text
    assert _versions(_table(second.text, "run-logged-artifacts")) == [f"{seeded.artifact}:v1"]
    used = _table(second.text, "run-used-artifacts")
    assert _versions(used) == [f"{seeded.artifact}:v0"]
    assert f'href="/{seeded.v0}"' in used
    assert f'href="/projects/{PROJECT}/runs/{seeded.first}"' in used  # v0's logged-by run
    resumed = _found(r'data-testid="run-resumed-from" href="([^"]+)"', second.text)
    assert resumed == f"/projects/{PROJECT}/runs/{seeded.first}"
    assert 'data-testid="chart-attempts"' in second.text

    first = browser.get(f"/projects/{PROJECT}/runs/{seeded.first}")
    assert first.status_code == 200, first.text
    assert _versions(_table(first.text, "run-logged-artifacts")) == [f"{seeded.artifact}:v0"]
    assert _versions(_table(first.text, "run-used-artifacts")) == []
    resumed_by = _found(r'data-testid="run-resumed-by">(.*?)</dd>', first.text)
    assert f'href="/projects/{PROJECT}/runs/{seeded.second}"' in resumed_by
    assert 'data-testid="run-resumed-from"' not in first.text


def test_the_artifact_pages_show_versions_files_aliases_metadata_and_lineage(
    console: Console, seeded: Seeded
) -> None:
    browser = signed_in(console, ADMIN_KEY)
    listing = browser.get(f"/projects/{PROJECT}/artifactCollections")
    assert listing.status_code == 200, listing.text
    row = _found(rf'data-artifact="{seeded.artifact}">(.*?)</tr>', listing.text)
    assert 'data-field="version-count">2<' in row
    assert f'href="/projects/{PROJECT}/artifactCollections/{seeded.artifact}/versions/1">v1<' in row
    assert 'data-testid="nav-artifacts"' in listing.text

    collection = browser.get(f"/projects/{PROJECT}/artifactCollections/{seeded.artifact}")
    assert collection.status_code == 200, collection.text
    assert _versions(_table(collection.text, "artifact-versions")) == [
        f"{seeded.artifact}:v1",
        f"{seeded.artifact}:v0",
    ]

    page = browser.get("/" + seeded.v0)
    assert page.status_code == 200, page.text
    files = re.findall(r'data-testid="artifact-file" data-path="([^"]+)"', page.text)
    assert files == [NOTES_PATH, "weights.bin"]
    assert f'title="{len(WEIGHTS)} bytes">2.0 MiB<' in page.text
    assert f'href="/{seeded.v0}/files/{quote(NOTES_PATH)}"' in page.text
    assert (
        _found(r'data-testid="artifact-aliases">(.*?)</dd>', page.text) == '<span class="muted">none</span>'
    )

    logged_by = _found(r'data-testid="artifact-logged-by" href="([^"]+)"', page.text)
    assert logged_by == f"/projects/{PROJECT}/runs/{seeded.first}"
    used_by = _found(r'data-testid="artifact-used-by">(.*?)</dd>', page.text)
    assert f'href="/projects/{PROJECT}/runs/{seeded.second}"' in used_by
    metadata = _found(r'data-testid="artifact-metadata">(.*?)</pre>', page.text)
    assert "&lt;b&gt;" in metadata
    assert json.loads(html.unescape(metadata)) == {"epoch": 3, "note": "<b>not markup</b>"}

    latest = browser.get(f"/projects/{PROJECT}/artifactCollections/{seeded.artifact}/versions/1")
    assert re.search(r'data-testid="artifact-aliases"><span class="tag">latest</span>', latest.text)


def test_a_file_downloads_through_the_console_as_an_attachment(console: Console, seeded: Seeded) -> None:
    browser = signed_in(console, ADMIN_KEY)
    with browser.stream("GET", f"/{seeded.v0}/files/weights.bin") as answer:
        assert answer.status_code == 200
        assert answer.headers["content-length"] == str(len(WEIGHTS))
        assert answer.headers["content-type"] == "application/octet-stream"
        assert answer.headers["content-disposition"] == (
            "attachment; filename=\"weights.bin\"; filename*=UTF-8''weights.bin"
        )
        pieces = list(answer.iter_raw())
    assert b"".join(pieces) == WEIGHTS

    head = browser.head(f"/{seeded.v0}/files/weights.bin")
    assert (head.status_code, head.headers["content-length"], head.content) == (200, str(len(WEIGHTS)), b"")

    notes = browser.get(f"/{seeded.v0}/files/{quote(NOTES_PATH)}")
    assert notes.status_code == 200
    assert notes.content == NOTES
    assert notes.headers["content-disposition"] == (
        "attachment; filename=\"notes__t_.txt\"; filename*=UTF-8''notes%20%C3%A9t%C3%A9.txt"
    )

    missing = browser.get(f"/{seeded.v0}/files/no-such-file")
    assert missing.status_code == 404
    assert 'data-testid="error-reason">ARTIFACT_FILE_NOT_FOUND<' in missing.text


class CuttingProxy:
    """A TCP proxy to ``target`` that cuts its first connection once ``cut_after`` bytes went back through
    it, as a registry that restarts mid-download would; later connections pass whole."""

    def __init__(self, target: str, cut_after: int) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._cut_after = cut_after
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            upstream = socket.create_connection(self._target)
            first = self.connections == 1
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, first), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, cutting: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                sent += len(data)
                if cutting and sent > self._cut_after:
                    self.cut.set()
                    break
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._listener.close()


def test_a_download_cut_short_by_the_registry_continues_where_it_stopped(
    services: tuple[ServiceProcess, ServiceProcess, Path], tmp_path: Path
) -> None:
    """The console's connection to the registry breaks mid-file; the console opens the file again at the
    byte it had reached, so the browser gets every byte once, in one answer of the announced length."""
    registry, queue, _ = services
    data = secrets.token_bytes(6 * CHUNK)
    with open_channel(registry.address, api_key=ADMIN_KEY) as channel:
        stub = artifacts_pb2_grpc.ArtifactServiceStub(channel)
        version = _log_artifact(stub, f"big-{secrets.token_hex(4)}", "", {"big.bin": data})
    proxy = CuttingProxy(registry.address, cut_after=2 * CHUNK)
    try:
        with console_process(tmp_path, proxy.address, queue.address) as console:
            browser = signed_in(console, ADMIN_KEY)
            with browser.stream("GET", f"/{version.name}/files/big.bin") as answer:
                assert answer.headers["content-length"] == str(len(data))
                received = b"".join(answer.iter_raw())
    finally:
        proxy.close()
    assert proxy.cut.is_set()
    assert proxy.connections >= 2
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_key_without_artifacts_read_is_told_the_permission(console: Console, seeded: Seeded) -> None:
    """A key of another project reads none of this one: the artifact pages and downloads are a 403 page
    naming the permission, and nothing of the file is sent."""
    browser = signed_in(console, project_key(console.registry, keys_pb2.PROJECT_ROLE_READ, project="other"))
    for path in (
        f"/projects/{PROJECT}/artifactCollections",
        "/" + seeded.v0,
        f"/{seeded.v0}/files/weights.bin",
    ):
        refused = browser.get(path)
        assert refused.status_code == 403, path
        assert '<code data-testid="error-permission">artifacts.read</code>' in refused.text, path
        assert WEIGHTS[:64] not in refused.content


def test_a_key_that_reads_runs_but_not_artifacts_sees_the_run_without_its_lineage(
    console: Console, seeded: Seeded
) -> None:
    """The queue service's key reads runs but no artifacts: the run page still shows, and its artifacts
    section names the permission instead of failing the whole page."""
    with open_channel(console.registry, api_key=ADMIN_KEY) as channel:
        key = (
            keys_pb2_grpc.KeyServiceStub(channel)
            .CreateKey(
                keys_pb2.CreateKeyRequest(
                    key=keys_pb2.Key(kind=keys_pb2.KEY_KIND_SERVICE, service=keys_pb2.SERVICE_ROLE_QUEUE)
                ),
                timeout=30,
            )
            .secret
        )
    page = signed_in(console, key).get(f"/projects/{PROJECT}/runs/{seeded.second}")
    assert page.status_code == 200, page.text
    refused = _found(r'data-testid="lineage-refused">(.*?)</p>', page.text)
    assert "<code>artifacts.read</code>" in refused
    assert 'data-testid="run-logged-artifacts"' not in page.text
    assert 'data-testid="run-resumed-from"' in page.text


def test_a_resumed_run_s_chart_data_has_each_attempt_s_segment_in_order(
    console: Console, seeded: Seeded
) -> None:
    browser = signed_in(console, ADMIN_KEY)
    data = browser.get(f"/projects/{PROJECT}/runs/{seeded.second}/metrics").json()
    segments = [(s["run"], s["label"], [row["step"] for row in s["rows"]]) for s in data["segments"]]
    assert segments == [
        (seeded.first, "attempt 1", [0, 1, 2, 3, 4]),
        (seeded.second, "attempt 2", [5, 6, 7, 8, 9]),
    ]
    assert data["segments"][1]["rows"][0]["values"] == {"loss": 5.0}

    url = f"/projects/{PROJECT}/runs/{seeded.second}/metrics/events?attempts=1"
    with browser.stream("GET", url, headers={"accept": "text/event-stream"}) as answer:
        seen: list[str | int] = []
        for name, payload in events(answer):
            if name == "segment":
                seen.append(payload["label"])
            elif name == "rows":
                seen.extend(row["step"] for row in cast(list[dict[str, Any]], payload))  # rows: a list
            elif name == "end":
                break
    assert seen == ["attempt 1", 0, 1, 2, 3, 4, "attempt 2", 5, 6, 7, 8, 9]

    alone = browser.get(f"/projects/{PROJECT}/runs/{seeded.first}/metrics").json()
    assert [s["label"] for s in alone["segments"]] == ["attempt 1"]
