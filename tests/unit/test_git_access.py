"""Which git remotes get the https token: scheme, host and port exactly, the path by whole segments."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from takeoff_server.git_access import GitAccessSettings, GitCredentials, TokenScope

TOKEN = "s3cret-token"


def gets_token(scope: str, url: str) -> bool:
    settings = GitAccessSettings(git_https_token=SecretStr(TOKEN), git_https_token_scope=scope)
    return "GIT_CONFIG_VALUE_0" in settings.git_credentials.environment(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://git.example.com/org/repo.git",
        "https://git.example.com/org/",
        "https://git.example.com/org",
        "https://git.example.com:443/org/repo.git",  # the default port, spelt out
        "https://GIT.Example.COM/org/repo.git",  # host names are not case-sensitive
        "HTTPS://git.example.com/org/repo.git",
        "https://git.example.com/org/team/repo.git?ref=x",
        "https://git.example.com//org/repo.git",  # an empty segment is no segment
        "https://git.example.com/%6Frg/repo.git",  # the same segment, percent-encoded
    ],
)
def test_a_remote_under_the_scope_gets_the_token(url: str) -> None:
    assert gets_token("https://git.example.com/org", url)


@pytest.mark.parametrize(
    ("url", "attack"),
    [
        ("https://git.example.com.evil.example/org/repo.git", "host suffix"),
        ("https://evil-git.example.com/org/repo.git", "host prefix"),
        ("https://example.com/org/repo.git", "parent domain"),
        ("https://sub.git.example.com/org/repo.git", "subdomain"),
        ("https://git.example.com:8443/org/repo.git", "other port"),
        ("https://git.example.com/organisation/repo.git", "segment prefix"),
        ("https://git.example.com/org-evil/repo.git", "segment prefix with a dash"),
        ("https://git.example.com/other/org/repo.git", "segment further down"),
        ("https://git.example.com/", "above the scope"),
        ("https://git.example.com/org/../evil/repo.git", "dot segments the server resolves"),
        ("https://git.example.com/org/%2e%2e/evil/repo.git", "encoded dot segments"),
        ("https://git.example.com/org%2F..%2Fevil/repo.git", "encoded slashes"),
        ("https://git.example.com@evil.example/org/repo.git", "scope host as user information"),
        ("https://user@git.example.com/org/repo.git", "user information of its own"),
        ("https://user:pass@git.example.com/org/repo.git", "a password of its own"),
        ("http://git.example.com/org/repo.git", "plain http"),
        ("ssh://git.example.com/org/repo.git", "ssh"),
        ("git@git.example.com:org/repo.git", "scp-like ssh"),
        ("https://git.example.com:notaport/org/repo.git", "a port that is not a number"),
        ("https://git.example.com./org/repo.git", "a trailing dot makes another host name"),
    ],
)
def test_a_remote_outside_the_scope_gets_no_token(url: str, attack: str) -> None:
    assert not gets_token("https://git.example.com/org", url), attack


def test_a_scope_without_a_path_covers_the_host_only() -> None:
    scope = "https://git.example.com"
    assert gets_token(scope, "https://git.example.com/any/repo.git")
    assert not gets_token(scope, "https://git.example.com.evil.example/any/repo.git")
    assert not gets_token(scope, "https://git.example.com:444/any/repo.git")


def test_a_scope_with_a_port_covers_that_port_only() -> None:
    scope = "https://127.0.0.1:8443/team/"
    assert gets_token(scope, "https://127.0.0.1:8443/team/repo.git")
    assert not gets_token(scope, "https://127.0.0.1/team/repo.git")
    assert not gets_token(scope, "https://127.0.0.1:443/team/repo.git")
    assert gets_token("https://git.example.com:443/org", "https://git.example.com/org/repo.git")


def test_the_default_scope_covers_every_https_remote_and_nothing_else() -> None:
    assert gets_token("https://", "https://anywhere.example/repo.git")
    assert not gets_token("https://", "http://anywhere.example/repo.git")
    assert not gets_token("https://", "https://user@anywhere.example/repo.git")


def test_the_token_goes_as_a_basic_header_with_redirects_off() -> None:
    credentials = GitCredentials(https_token=TOKEN, https_token_scope=TokenScope.parse("https://h.example"))
    environment = credentials.environment("https://h.example/repo.git")
    assert environment["GIT_CONFIG_KEY_0"] == "http.extraHeader"
    assert environment["GIT_CONFIG_VALUE_0"] == "Authorization: Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0LXRva2Vu"
    assert (environment["GIT_CONFIG_KEY_1"], environment["GIT_CONFIG_VALUE_1"]) == (
        "http.followRedirects",
        "false",
    )
    assert "GIT_CONFIG_COUNT" not in credentials.environment("https://other.example/repo.git")
    assert "GIT_CONFIG_COUNT" not in GitCredentials().environment("https://h.example/repo.git")


@pytest.mark.parametrize(
    ("scope", "problem"),
    [
        ("http://git.example.com/", "must be an https:// URL"),
        ("git.example.com/org", "must be an https:// URL"),
        ("https://user@git.example.com/", "must not carry user information"),
        ("https://git.example.com/org?x=1", "must not have a query or fragment"),
        ("https://git.example.com/org#x", "must not have a query or fragment"),
        ("https://git.example.com/org/../other", "must not contain '.' or '..' path segments"),
        ("https://git.example.com:https/", "must be an https:// URL"),
        ("https:///org", "a scope with a path needs a host"),
    ],
)
def test_a_scope_that_is_not_a_plain_https_url_is_refused(scope: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        GitAccessSettings(git_https_token_scope=scope)
