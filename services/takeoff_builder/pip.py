"""How pip is pointed at a package index, and how its failures are told apart.

A requirement pip rejects is the job's fault (BUILD_FAILED); an index pip cannot reach is not
(BUILD_INFRA, retryable). pip says "could not find a version" in both cases, so its log decides: any
sign of network trouble makes the failure an infrastructure one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from takeoff_builder.model import BuildError, BuildFailed, BuildInfraError

_NETWORK_TROUBLE = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Max retries exceeded",
    "SSLError",
    "ProxyError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
    "No space left on device",
)


@dataclass(frozen=True, slots=True)
class PackageIndex:
    index_url: str | None = None
    extra_index_urls: Sequence[str] = field(default_factory=tuple)
    ca_bundle: Path | None = None

    def environment(self, *, ca_bundle_path: str | None = None) -> dict[str, str]:
        """``PIP_*`` variables for these settings; ``ca_bundle_path`` where the bundle is (a build's copy)."""
        variables = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_PROGRESS_BAR": "off"}
        if self.index_url:
            variables["PIP_INDEX_URL"] = self.index_url
        if self.extra_index_urls:
            variables["PIP_EXTRA_INDEX_URL"] = " ".join(self.extra_index_urls)
        certificate = ca_bundle_path or (str(self.ca_bundle) if self.ca_bundle else None)
        if certificate:
            variables["PIP_CERT"] = certificate
        return variables

    def public(self) -> tuple[PackageIndex, list[str]]:
        """These settings without the index URLs that carry credentials, which must not go into an
        image (``docker history`` would show them); also says what was left out and why."""
        dropped: list[str] = []
        index_url = self.index_url
        if index_url and carries_credentials(index_url):
            dropped.append("pip_index_url carries credentials, so image builds use pip's default index")
            index_url = None
        extras = [url for url in self.extra_index_urls if not carries_credentials(url)]
        if len(extras) < len(self.extra_index_urls):
            dropped.append("extra index URLs that carry credentials are left out of image builds")
        return PackageIndex(index_url, tuple(extras), self.ca_bundle), dropped

    def secrets(self) -> list[str]:
        """The credentials inside the URLs, to be blanked out of every log line."""
        found = []
        for url in (self.index_url, *self.extra_index_urls):
            if url:
                parts = urlsplit(url)
                found += [secret for secret in (parts.password, parts.username) if secret]
        return found


def carries_credentials(url: str) -> bool:
    parts = urlsplit(url)
    return parts.username is not None or parts.password is not None


def pip_failure(output: Sequence[str], *, what: str) -> BuildError:
    """The error for a failed ``pip install``, judged from its output."""
    said = next((line for line in reversed(output) if line.startswith("ERROR:")), "")
    detail = said.removeprefix("ERROR:").strip()
    if any(marker in line for line in output for marker in _NETWORK_TROUBLE):
        return BuildInfraError(f"{what}: the package index could not be reached ({detail or 'see the log'})")
    return BuildFailed(f"{what}: {detail or 'pip failed; see the log'}")
