"""The launch form: fields generated from a job version's input JSON Schema and a queue's template variables,
the submitted values read back into typed JSON, and the server's field violations put next to their fields.

The browser does not enforce the schema (the form is ``novalidate``): the queue service checks the run config
against the schema at Enqueue, and its field violations (``run_config.lr``, ``template_variables.cpu``) are
shown beside the inputs they name, so the console never second-guesses the server's rules. Only what cannot
be sent at all (``abc`` for an integer, JSON that does not parse) is refused here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from takeoff_rpc.status import FieldViolation

RUN_CONFIG = "run_config"
TEMPLATE_VARIABLES = "template_variables"
RESOURCE_CONFIG = "resource_config"
PRIORITY = "priority"
QUEUE = "queue"


@dataclass
class FormField:
    """One input of the form; ``name`` is its form field (``run_config.lr``), which errors are keyed by."""

    name: str
    label: str
    kind: str
    """``integer``, ``number``, ``string``, ``boolean``, ``enum``, or ``json`` for anything else."""
    value: str
    testid: str
    description: str = ""
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: list[tuple[str, str]] = field(default_factory=list)
    """``enum`` and ``boolean``: (form value, label)."""
    error: str = ""


@dataclass
class Submission:
    """What a valid submitted form asks to enqueue, as plain JSON values."""

    run_config: dict[str, Any]
    template_variables: dict[str, Any]
    resource_config: dict[str, Any] | None
    priority: str
    request_id: str


@dataclass
class LaunchForm:
    """The whole form: its fields, what was typed, and every error to show."""

    config_fields: list[FormField]
    variable_fields: list[FormField]
    request_id: str
    """Sent with the form and on to Enqueue, so that a form submitted twice enqueues once."""
    priority: str = "medium"
    resource_config: str = ""
    resource_config_error: str = ""
    errors: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        schema: Mapping[str, Any],
        defaults: Mapping[str, Any],
        variables: Mapping[str, Mapping[str, Any]],
        request_id: str,
    ) -> LaunchForm:
        """The form for a version's input ``schema`` and ``defaults`` and a queue's template ``variables``
        (name -> JSON Schema)."""
        config = schema_fields(schema, defaults, prefix=RUN_CONFIG, testid_prefix="launch-field")
        variable_fields = [
            field_for(
                spec,
                name=f"{TEMPLATE_VARIABLES}.{name}",
                label=name,
                default=spec.get("default"),
                testid=f"launch-var-{name}",
                required="default" not in spec,
            )
            for name, spec in variables.items()
        ]
        return cls(config, variable_fields, request_id)

    @property
    def fields(self) -> list[FormField]:
        return [*self.config_fields, *self.variable_fields]

    def read(self, form: Mapping[str, str]) -> Submission | None:
        """The submission, or None when a value cannot be sent (its field then says why)."""
        run_config = read_values(self.config_fields, form)
        template_variables = read_values(self.variable_fields, form)
        self.priority = form.get(PRIORITY, "medium")
        self.resource_config = form.get(RESOURCE_CONFIG, "")
        resource_config, self.resource_config_error = read_resource_config(self.resource_config)
        self.request_id = form.get("request_id") or self.request_id
        if any(f.error for f in self.fields) or self.resource_config_error:
            return None
        return Submission(run_config, template_variables, resource_config, self.priority, self.request_id)

    def refused(self, violations: Iterable[FieldViolation], message: str) -> None:
        """Show the server's refusal: each violation by its field, the rest (or the message) above."""
        resource = FormField(RESOURCE_CONFIG, "", "json", "", "")
        unplaced = place_violations([*self.fields, resource], violations)
        self.resource_config_error = resource.error
        self.errors = unplaced or ([] if resource.error or any(f.error for f in self.fields) else [message])


def schema_fields(
    schema: Mapping[str, Any], defaults: Mapping[str, Any], *, prefix: str, testid_prefix: str
) -> list[FormField]:
    """A field per property of an object schema, in the schema's order, holding its default."""
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return []
    required = set(schema.get("required") or ())
    fields = []
    for key, given in properties.items():
        spec = given if isinstance(given, Mapping) else {}
        default = defaults[key] if key in defaults else spec.get("default")
        fields.append(
            field_for(
                spec,
                name=f"{prefix}.{key}",
                label=key,
                default=default,
                testid=f"{testid_prefix}-{key}",
                required=key in required,
            )
        )
    return fields


def field_for(
    spec: Mapping[str, Any], *, name: str, label: str, default: Any, testid: str, required: bool = False
) -> FormField:
    kind = _kind(spec)
    form_field = FormField(
        name=name,
        label=str(spec.get("title") or label),
        kind=kind,
        value=_shown(kind, default),
        testid=testid,
        description=str(spec.get("description") or ""),
        required=required,
        minimum=_number(spec.get("minimum", spec.get("exclusiveMinimum"))),
        maximum=_number(spec.get("maximum", spec.get("exclusiveMaximum"))),
    )
    if kind == "enum":
        form_field.choices = [(json.dumps(choice), str(choice)) for choice in spec["enum"]]
    elif kind == "boolean":
        form_field.choices = [("true", "true"), ("false", "false")]
    return form_field


def _kind(spec: Mapping[str, Any]) -> str:
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        return "enum"
    kinds = spec.get("type")
    if isinstance(kinds, list):
        kinds = next((k for k in kinds if k != "null"), None)
    return kinds if kinds in ("integer", "number", "string", "boolean") else "json"


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _shown(kind: str, value: Any) -> str:
    if value is None:
        return ""
    if kind in {"enum", "boolean"}:
        return json.dumps(value)
    if kind == "json":
        return json.dumps(value, indent=2)
    return str(value)


def read_values(fields: Iterable[FormField], form: Mapping[str, str]) -> dict[str, Any]:
    """The typed values of ``fields`` from the submitted ``form``, keyed by the last part of each name; a
    field left empty is left out (the server fills its default). Each value that cannot be read sets its
    field's ``error`` and is left out."""
    values: dict[str, Any] = {}
    for form_field in fields:
        text = form.get(form_field.name, "").strip()
        form_field.value = text
        if not text:
            continue
        try:
            values[form_field.name.rpartition(".")[2]] = _typed(form_field.kind, text)
        except ValueError as error:
            form_field.error = str(error)
    return values


def _typed(kind: str, text: str) -> Any:
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise ValueError("must be a whole number") from None
    if kind == "number":
        try:
            return float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ValueError("must be a number") from None
    if kind == "string":
        return text
    try:
        return json.loads(text)
    except ValueError as error:
        raise ValueError(f"is not valid JSON: {error}") from None


def read_resource_config(text: str) -> tuple[dict[str, Any] | None, str]:
    """The override editor's JSON object, or the reason it is refused."""
    if not text.strip():
        return None, ""
    try:
        value = json.loads(text)
    except ValueError as error:
        return None, f"is not valid JSON: {error}"
    if not isinstance(value, dict):
        return None, 'must be a JSON object, such as {"env": {"DEBUG": "1"}}'
    return value, ""


def place_violations(fields: Iterable[FormField], violations: Iterable[FieldViolation]) -> list[str]:
    """Put each violation on the field it names, or the nearest enclosing one; return those naming none."""
    by_name = {form_field.name: form_field for form_field in fields}
    unplaced = []
    for violation in violations:
        owner = _owner(violation.field, by_name)
        if owner is None:
            unplaced.append(
                f"{violation.field}: {violation.description}" if violation.field else violation.description
            )
        else:
            owner.error = f"{owner.error}; {violation.description}" if owner.error else violation.description
    return unplaced


def _owner(path: str, by_name: Mapping[str, FormField]) -> FormField | None:
    while path:
        if path in by_name:
            return by_name[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None
