from __future__ import annotations

from typing import Any

from takeoff_queue.resource_config import (
    ResourceKind,
    check_variable_declarations,
    deep_merge,
    effective_config,
    fill,
)

JOB_TEMPLATE: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "spec": {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "resources": {"limits": {"cpu": "{{cpu}}"}},
                        "env": [{"name": "A", "value": "1"}],
                    },
                    {"name": "sidecar", "image": "proxy:1"},
                ],
                "tolerations": [{"key": "gpu"}],
            }
        }
    },
}


def test_dicts_merge_and_plain_lists_are_replaced() -> None:
    merged = deep_merge({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3]}, "e": 2})

    assert merged == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}


def test_kubernetes_containers_and_env_merge_by_name() -> None:
    override = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [{"name": "main", "env": [{"name": "B", "value": "2"}]}, {"name": "extra"}],
                    "tolerations": [{"key": "spot"}],
                }
            }
        }
    }

    merged = deep_merge(JOB_TEMPLATE, override, by_name=True)

    pod = merged["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["main", "sidecar", "extra"]
    assert pod["containers"][0]["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    assert pod["containers"][0]["resources"] == {"limits": {"cpu": "{{cpu}}"}}
    assert pod["tolerations"] == [{"key": "spot"}]  # not a merged-by-name list
    assert JOB_TEMPLATE["spec"]["template"]["spec"]["tolerations"] == [{"key": "gpu"}]  # inputs untouched


def test_whole_placeholders_keep_their_type_and_embedded_ones_become_text() -> None:
    filled = fill(
        {"cpus": "{{cpu}}", "name": "run-{{cpu}}-{{zone}}", "list": ["{{ zone }}"]}, {"cpu": 4, "zone": "eu"}
    )

    assert filled == {"cpus": 4, "name": "run-4-eu", "list": ["eu"]}


def test_variables_are_defaulted_validated_and_filled() -> None:
    declared = {"cpu": {"type": "integer", "minimum": 1, "maximum": 8, "default": 2}}

    config, values, problems = effective_config(
        ResourceKind.KUBERNETES, JOB_TEMPLATE, {}, declared, {"cpu": 4}
    )
    assert problems == []
    assert values == {"cpu": 4}
    assert config["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == 4

    _, defaulted, _ = effective_config(ResourceKind.KUBERNETES, JOB_TEMPLATE, {}, declared, {})
    assert defaulted == {"cpu": 2}


def test_every_variable_problem_is_its_own_violation() -> None:
    declared: dict[str, dict[str, Any]] = {
        "cpu": {"type": "integer", "maximum": 8},
        "zone": {"type": "string", "enum": ["eu", "us"]},
    }

    _, _, problems = effective_config(
        ResourceKind.LOCAL_CONTAINER, {"cpus": "{{cpu}}"}, {}, declared, {"cpu": 64, "colour": "red"}
    )

    assert {p.field for p in problems} == {
        "template_variables.cpu",
        "template_variables.zone",
        "template_variables.colour",
    }
    assert any("64 is greater than the maximum of 8" in p.description for p in problems)


def test_options_outside_the_allow_list_are_refused() -> None:
    _, _, problems = effective_config(
        ResourceKind.LOCAL_CONTAINER,
        {"mem_limit": "1g"},
        {"privileged": True, "network_mode": "host"},
        {},
        {},
    )

    assert sorted(p.field for p in problems) == ["resource_config.network_mode", "resource_config.privileged"]


def test_a_kubernetes_config_must_be_a_job() -> None:
    _, _, problems = effective_config(ResourceKind.KUBERNETES, {"kind": "Deployment"}, {}, {}, {})

    assert [p.field for p in problems] == ["resource_config.kind"]


def test_queue_declarations_are_checked() -> None:
    problems = check_variable_declarations(
        {"cpu": {"minimum": 1}, "9lives": {"type": "integer"}, "gpu": {"type": "integer", "default": "many"}},
        {"cpus": "{{cpu}}", "image": "{{tag}}"},
    )

    fields = sorted(p.field for p in problems)
    assert fields == [
        "queue.resource_config",
        "queue.template_variables[9lives]",
        "queue.template_variables[cpu].schema",
        "queue.template_variables[gpu].schema.default",
    ]
