"""Following a file a job writes, line by line, from where the last reader stopped."""

from __future__ import annotations

from pathlib import Path

MAX_LINE_BYTES = 64 * 1024


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
        return [
            line[i : i + MAX_LINE_BYTES]
            for line in lines
            for i in range(0, max(len(line), 1), MAX_LINE_BYTES)
        ]
