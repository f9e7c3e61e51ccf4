"""Following a file a job writes, line by line, from where the last reader stopped."""

from __future__ import annotations

from pathlib import Path

from takeoff_agent.domain import LogStream
from takeoff_agent.ranks import ONE_PROCESS, World
from takeoff_agent.runners.base import JobOutput
from takeoff_agent.shim import output_files

MAX_LINE_BYTES = 64 * 1024
"""The registry's limit on one log line (UTF-8); longer lines arrive as several."""


class LogTail:
    """Complete lines appended to ``path`` since ``offset``; a line still being written waits."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset

    def read_lines(self, *, final: bool = False) -> list[str]:
        """New complete lines; with ``final``, also the last line even without its newline."""
        try:
            with self.path.open("rb") as file:
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            return []
        end = len(data) if final else data.rfind(b"\n") + 1
        if end <= 0:
            return []
        self.offset += end
        lines = data[:end].decode("utf-8", errors="replace").splitlines()
        return [piece for line in lines for piece in split_long_line(line)]


def split_long_line(line: str) -> list[str]:
    """``line`` cut at character boundaries into pieces of at most MAX_LINE_BYTES encoded bytes (the
    registry's limit), for every runner's log source."""
    if len(line) <= MAX_LINE_BYTES // 4 or len(line.encode()) <= MAX_LINE_BYTES:
        return [line]
    pieces, start, size = [], 0, 0
    for position, character in enumerate(line):
        width = len(character.encode())
        if size + width > MAX_LINE_BYTES:
            pieces.append(line[start:position])
            start, size = position, 0
        size += width
    pieces.append(line[start:])
    return pieces


def shim_output(lease_dir: Path, world: World = ONE_PROCESS) -> list[JobOutput]:
    """The job's stdout and stderr as its shim writes them into its lease directory, rank by rank for a
    multi-node launch."""
    ranks: list[int | None] = list(range(world.size)) if world.multi else [None]
    return [
        JobOutput(stream, LogTail(lease_dir / name), rank)
        for rank in ranks
        for stream, name in zip((LogStream.STDOUT, LogStream.STDERR), output_files(rank), strict=True)
    ]
