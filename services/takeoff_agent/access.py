"""Who may call AgentService (docs/design.md §13): its status and its drain concern the whole agent."""

from __future__ import annotations

from takeoff_server.access import AccessRules, Permission, constant, needs

RULES: AccessRules = {
    "GetStatus": needs(Permission.AGENTS_READ, constant("agents")),
    "Drain": needs(Permission.AGENTS_WRITE, constant("agents")),
}
