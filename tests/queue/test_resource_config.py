from __future__ import annotations

from typing import Any

import pytest

from takeoff_queue.resource_config import (
    ResourceKind,
    check_for_resource,
    check_variable_declarations,
    effective_config,
    fill,
)
from takeoff_server.errors import InvalidArgument
from takeoff_server.resource_configs import deep_merge
from takeoff_server.validation import Problems

LIMIT = 1024 * 1024

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
        ResourceKind.KUBERNETES, JOB_TEMPLATE, {}, declared, {"cpu": 4}, max_json_bytes=LIMIT
    )
    assert problems == []
    assert values == {"cpu": 4}
    assert config["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == 4

    _, defaulted, _ = effective_config(
        ResourceKind.KUBERNETES, JOB_TEMPLATE, {}, declared, {}, max_json_bytes=LIMIT
    )
    assert defaulted == {"cpu": 2}


def test_every_variable_problem_is_its_own_violation() -> None:
    declared: dict[str, dict[str, Any]] = {
        "cpu": {"type": "integer", "maximum": 8},
        "zone": {"type": "string", "enum": ["eu", "us"]},
    }

    _, _, problems = effective_config(
        ResourceKind.LOCAL_CONTAINER,
        {"cpus": "{{cpu}}"},
        {},
        declared,
        {"cpu": 64, "colour": "red"},
        max_json_bytes=LIMIT,
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
        max_json_bytes=LIMIT,
    )

    assert sorted(p.field for p in problems) == ["resource_config.network_mode", "resource_config.privileged"]


def test_a_kubernetes_config_must_be_a_job() -> None:
    _, _, problems = effective_config(
        ResourceKind.KUBERNETES, {"kind": "Deployment"}, {}, {}, {}, max_json_bytes=LIMIT
    )

    assert [p.field for p in problems] == ["resource_config.kind"]


def test_queue_declarations_are_checked() -> None:
    problems = Problems()
    check_variable_declarations(
        {
            "cpu": {"minimum": 1},
            "9lives": {"type": "integer"},
            "gpu": {"type": "integer", "default": "many"},
            "zone": {"type": "string", "$ref": "#/$defs/nowhere"},
        },
        {"cpus": "{{cpu}}", "image": "{{tag}}"},
        problems,
    )

    with pytest.raises(InvalidArgument) as refused:
        problems.raise_if_any()
    assert sorted(v.field for v in refused.value.violations) == [
        "queue.resource_config",
        "queue.template_variables[9lives]",
        "queue.template_variables[cpu].schema",
        "queue.template_variables[gpu].schema.default",
        "queue.template_variables[zone].schema",
    ]


@pytest.mark.parametrize(
    ("kind", "config", "field"),
    [
        (ResourceKind.KUBERNETES, {"spec": "a string"}, "resource_config.spec"),
        (ResourceKind.KUBERNETES, {"spec": {"template": []}}, "resource_config.spec.template"),
        (
            ResourceKind.KUBERNETES,
            {"metadata": {"labels": {"team": 3}}},
            "resource_config.metadata.labels.team",
        ),
        (
            ResourceKind.KUBERNETES,
            {"spec": {"template": {"spec": {"containers": {"name": "main"}}}}},
            "resource_config.spec.template.spec.containers",
        ),
        (
            ResourceKind.KUBERNETES,
            {"spec": {"template": {"spec": {"containers": [{"name": "main", "env": [{"value": "1"}]}]}}}},
            "resource_config.spec.template.spec.containers[0].env[0]",
        ),
        (ResourceKind.LOCAL_CONTAINER, {"cpus": {"many": True}}, "resource_config.cpus"),
        (ResourceKind.LOCAL_CONTAINER, {"ulimits": {"nofile": 1}}, "resource_config.ulimits"),
        (ResourceKind.LOCAL_CONTAINER, {"env": ["A=1"]}, "resource_config.env"),
        (ResourceKind.LOCAL_CONTAINER, {"volumes": ["/srv:/data"]}, "resource_config.volumes[0]"),
        (ResourceKind.LOCAL_CONTAINER, {"volumes": ["data:/d", "../up:/up"]}, "resource_config.volumes[1]"),
        (ResourceKind.LOCAL_CONTAINER, {"volumes": {"~/x": {"bind": "/x"}}}, "resource_config.volumes.~/x"),
        (ResourceKind.LOCAL_CONTAINER, {"volumes": ["data"]}, "resource_config.volumes[0]"),
        (ResourceKind.LOCAL_CONTAINER, {"volumes": {"data": "/data"}}, "resource_config.volumes.data"),
        (ResourceKind.LOCAL_PROCESS, {"env": {"A": {"nested": 1}}}, "resource_config.env.A"),
        (ResourceKind.LOCAL_PROCESS, {"env": {"A": "nul\x00byte"}}, "resource_config.env.A"),
    ],
)
def test_a_config_of_the_wrong_shape_is_named_not_a_crash(
    kind: ResourceKind, config: dict[str, Any], field: str
) -> None:
    for default, override in (({}, config), (config, {})):  # a queue's default, an item's override
        _, _, problems = effective_config(kind, default, override, {}, {}, max_json_bytes=LIMIT)
        assert [p.field for p in problems] == [field]


def test_a_placeholder_stands_for_any_shape_until_enqueue_fills_it() -> None:
    default = {"spec": "{{spec}}"}
    assert check_for_resource(ResourceKind.KUBERNETES, default, "queue.resource_config", unfilled=True) == []

    declared = {"spec": {"type": "string"}}
    _, _, problems = effective_config(
        ResourceKind.KUBERNETES, default, {}, declared, {"spec": "flat"}, max_json_bytes=LIMIT
    )
    assert [p.field for p in problems] == ["resource_config.spec"]


def test_a_volume_source_from_a_variable_is_checked_once_filled() -> None:
    default = {"volumes": ["{{source}}:/data"]}
    assert (
        check_for_resource(ResourceKind.LOCAL_CONTAINER, default, "queue.resource_config", unfilled=True)
        == []
    )

    declared = {"source": {"type": "string"}}
    for source, refused in (("cache", False), ("/etc", True)):
        _, _, problems = effective_config(
            ResourceKind.LOCAL_CONTAINER, default, {}, declared, {"source": source}, max_json_bytes=LIMIT
        )
        assert [p.field for p in problems] == (["resource_config.volumes[0]"] if refused else [])


def test_a_value_used_many_times_cannot_blow_the_config_up() -> None:
    default = {"env": {f"V{i}": "{{blob}}" for i in range(100)}}
    declared = {"blob": {"type": "string"}}

    merged, _, problems = effective_config(
        ResourceKind.LOCAL_PROCESS, default, {}, declared, {"blob": "x" * 20_000}, max_json_bytes=LIMIT
    )

    assert merged == {}
    assert [p.field for p in problems] == ["resource_config"]
