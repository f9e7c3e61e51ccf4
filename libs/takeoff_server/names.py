"""Resource names and ids (AIP-122) as the v1 API defines them, checked with errors clients can act on.

An id is 1-63 characters of lowercase letters, digits, ``-`` and ``_``, starting with a letter or digit.
A resource name is a template of literal collection segments and ids, ``projects/{project}/jobs/{job}``.
"""

from __future__ import annotations

import re

from takeoff_server.errors import FieldViolation, InvalidArgument

ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
_ID = re.compile(ID_PATTERN)
_VARIABLE = re.compile(r"\{(\w+)\}")

NAME_INVALID = "NAME_INVALID"
ID_RULE = "1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"


def is_valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def check_id(value: str, *, field: str, kind: str = "id") -> str:
    """Return ``value`` if it is a valid id, else raise ``NAME_INVALID`` naming ``field``."""
    if is_valid_id(value):
        return value
    problem = f"{kind} is required" if not value else f"{kind} {value!r} must be {ID_RULE}"
    raise InvalidArgument(NAME_INVALID, problem, violations=[FieldViolation(field, problem)])


class ResourcePattern:
    """A resource-name template such as ``projects/{project}/jobs/{job}``.

    Every ``{variable}`` is an id unless ``segment_patterns`` gives it another regular expression (a
    version number, a sha256).
    """

    def __init__(self, template: str, **segment_patterns: str) -> None:
        self.template = template
        self.variables = tuple(_VARIABLE.findall(template))
        regex = re.escape(template)
        for variable in self.variables:
            pattern = segment_patterns.get(variable, ID_PATTERN)
            regex = regex.replace(re.escape(f"{{{variable}}}"), f"(?P<{variable}>{pattern})", 1)
        self._regex = re.compile(regex)

    def match(self, name: str) -> dict[str, str] | None:
        """The variables of ``name``, or None when it does not have this pattern."""
        matched = self._regex.fullmatch(name)
        return matched.groupdict() if matched else None

    def parse(self, name: str, *, field: str) -> dict[str, str]:
        """The variables of ``name``; raises ``NAME_INVALID`` naming ``field`` when it does not match."""
        variables = self.match(name)
        if variables is None:
            problem = (
                f"{field} is required, in the form {self.template}"
                if not name
                else f"{name!r} is not a valid name of the form {self.template} (ids: {ID_RULE})"
            )
            raise InvalidArgument(NAME_INVALID, problem, violations=[FieldViolation(field, problem)])
        return variables

    def format(self, **variables: str | int) -> str:
        return self.template.format(**variables)
