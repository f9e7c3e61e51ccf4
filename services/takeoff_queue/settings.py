"""Queue service settings (``TAKEOFF_*`` variables, a YAML file, or these defaults)."""

from takeoff_server.config import ServerSettings


class QueueSettings(ServerSettings):
    listen: list[str] = ["127.0.0.1:50052"]
