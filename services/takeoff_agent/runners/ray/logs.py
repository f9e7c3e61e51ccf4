"""The output of a Ray job, as the attempt reads it: the driver's log, and what the runner sees happen."""

from __future__ import annotations


class DriverLog:
    """A LogSource of the job's driver output (stdout and stderr merged by Ray).

    The Jobs API serves the whole log at each read; ``offset`` counts the characters of it already taken
    as complete lines, so a restarted agent (which sets the offset it recorded back) sends each line once.
    ``text`` is set by whoever polls the API; ``read_lines`` only cuts it into lines.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.text = ""

    def read_lines(self, *, final: bool = False) -> list[str]:
        new = self.text[self.offset :]
        if not final:
            new = new[: new.rfind("\n") + 1]
        self.offset += len(new)
        return new.splitlines()


class StatusLines:
    """A LogSource of SYSTEM lines: the job's submission id, why it is pending, what ended it. Best effort
    across agent restarts: a restarted agent says what it sees from then on."""

    def __init__(self) -> None:
        self.offset = 0
        self._lines: list[str] = []
        self._last = ""

    @property
    def last(self) -> str:
        """The text most recently added."""
        return self._last

    def add(self, text: str) -> None:
        if text and text != self._last:
            self._last = text
            self._lines.append(f"[takeoff] {text}")

    def read_lines(self, *, final: bool = False) -> list[str]:
        taken, self._lines = self._lines, []
        self.offset += len(taken)
        return taken
