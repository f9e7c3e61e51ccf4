"""Who may call BuildService (docs/design.md §13): each method's rule, checked on every request.

A Build names the job version to build; the caller needs ``builds.write`` on it (an agent key has it in
the projects of its queues, so an agent builds only the jobs it may be given). Builds are read by name.
"""

from __future__ import annotations

from takeoff_server.access import AccessRules, Permission, constant, fields, needs

RULES: AccessRules = {
    "Build": needs(Permission.BUILDS_WRITE, fields("job_version")),
    "GetBuild": needs(Permission.BUILDS_READ, fields("name")),
    "ListBuilds": needs(Permission.BUILDS_READ, constant("builds")),
}
