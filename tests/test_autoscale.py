"""deployments/autoscale.json scales a deployment on the load this server measures itself by, slowly enough for
a model that takes minutes to load; deployments/autoscale.py applies it (docs/deploying.md, "Autoscale")."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from datetime import timedelta

import pytest
from azure.mgmt.monitor.models import AutoscaleSettingResource

from .test_deployment_files import ROOT, SKU_FILES, load

RULES = ROOT / "deployments" / "autoscale.json"
ONLINE_FILES = ["deployment.yml", *SKU_FILES]
# Azure ML's managed online endpoint limits (how-to-manage-quotas): instances per deployment, and the 20% extra
# it reserves for upgrades (10 instances need quota for 12).
MAX_INSTANCES_PER_DEPLOYMENT = 20
UPGRADE_RESERVE = 0.2

_spec = importlib.util.spec_from_file_location("autoscale", ROOT / "deployments" / "autoscale.py")
autoscale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(autoscale)


def setting_for(name: str) -> AutoscaleSettingResource:
    deployment = load(name)
    ids = autoscale.arm_ids(subscription="sub", resource_group="rg", workspace="ws",
                            endpoint=deployment["endpoint_name"], deployment=deployment["name"])
    return autoscale.autoscale_setting(json.loads(RULES.read_text()), deployment, location="eastus", ids=ids,
                                       name="test")


def rules(setting: AutoscaleSettingResource) -> dict[str, object]:
    """The profile's scale-out and scale-in rule, by direction; exactly one of each."""
    (profile,) = setting.profiles
    by_direction = {rule.scale_action.direction: rule for rule in profile.rules}
    assert len(by_direction) == len(profile.rules) == 2
    return by_direction


def test_the_rules_load_as_an_azure_monitor_autoscale_setting_for_one_deployment():
    setting = AutoscaleSettingResource.from_dict(json.loads(RULES.read_text()))
    assert setting.enabled is True and setting.target_resource_uri == "{deployment_id}"
    (profile,) = setting.profiles
    low, default, high = (int(profile.capacity.minimum), int(profile.capacity.default), int(profile.capacity.maximum))
    assert 1 <= low <= default <= high <= MAX_INSTANCES_PER_DEPLOYMENT
    # Starts where deployment.yml starts, and the quota the largest scale-out needs is the documented one.
    assert default == load("deployment.yml")["instance_count"]
    assert math.ceil(high * (1 + UPGRADE_RESERVE)) == 5  # 4 instances need quota for 5 (docs/deploying.md)
    assert setting.tags[autoscale.CAPACITY_TAG] == str(
        load("deployment.yml")["request_settings"]["max_concurrent_requests_per_instance"])


def test_both_rules_read_the_endpoints_active_connections_per_instance():
    """ConnectionsActive (the endpoint's concurrent client connections) divided by the deployment's instance count:
    one open request is one connection, which is what a replica's batch and line are counted in. GPU utilisation
    is not a load measure here: one decoding row keeps it high."""
    for rule in rules(AutoscaleSettingResource.from_dict(json.loads(RULES.read_text()))).values():
        trigger = rule.metric_trigger
        assert (trigger.metric_name, trigger.metric_resource_uri) == ("ConnectionsActive", "{endpoint_id}")
        assert trigger.divide_per_instance is True
        assert (trigger.statistic, trigger.time_aggregation, trigger.time_grain) == (
            "Average", "Average", timedelta(minutes=1))
        assert rule.scale_action.type == "ChangeCount" and rule.scale_action.value == "1"


@pytest.mark.parametrize("name", ONLINE_FILES)
def test_thresholds_come_from_what_the_deployments_replicas_hold(name: str):
    """Scale out while every open request still has a row in a batch (before anything waits in the line, long
    before the line fills and callers get 429), and scale in only far below that: after one of two instances goes,
    the one left carries twice its load, which must stay under the scale-out threshold, or the two rules flap."""
    deployment = load(name)
    env = deployment["environment_variables"]
    replicas = int(env.get("WORKER_COUNT", 1))
    batch, queue = int(env["MIXTRAL_MAX_BATCH_SIZE"]), int(env["MIXTRAL_MAX_QUEUE"])
    by_direction = rules(setting_for(name))
    out, back = by_direction["Increase"].metric_trigger, by_direction["Decrease"].metric_trigger
    assert (out.operator, back.operator) == ("GreaterThan", "LessThan")
    assert 0 < out.threshold < replicas * batch < replicas * (batch + queue)
    assert out.threshold >= replicas * batch / 2  # not so early that half a batch already scales out
    assert 0 < 2 * back.threshold < out.threshold


def test_cooldowns_outlast_a_model_load():
    """A new instance takes no load until it is ready (up to the readiness probe's allowance, 30 minutes): a
    scale-out cooldown shorter than that lets the rule see the same load again and add another instance for load
    the first was about to take. Scale-in waits longer still: a model load is paid again on the next scale-out."""
    by_direction = rules(setting_for("deployment.yml"))
    out, back = by_direction["Increase"].scale_action, by_direction["Decrease"].scale_action
    for name in ONLINE_FILES:
        probe = load(name)["readiness_probe"]
        ready_by = timedelta(seconds=probe["initial_delay"] + probe["period"] * probe["failure_threshold"])
        assert out.cooldown >= ready_by > timedelta(seconds=probe["initial_delay"]), name
    assert out.cooldown >= timedelta(minutes=20) and back.cooldown > out.cooldown
    assert by_direction["Decrease"].metric_trigger.time_window > by_direction["Increase"].metric_trigger.time_window


@pytest.mark.e2e  # the command, in its own process
def test_the_command_fills_in_the_deployments_ids_and_scales_thresholds_to_its_capacity():
    command = [sys.executable, str(ROOT / "deployments" / "autoscale.py"), "--subscription", "sub",
               "--resource-group", "rg", "--workspace", "ws", "--location", "eastus", "--dry-run"]
    blue = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    endpoint = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws" \
               "/onlineEndpoints/mixtral-8x7b"
    assert blue["location"] == "eastus" and blue["properties"]["name"] == "mixtral-8x7b-blue-autoscale"
    assert blue["properties"]["targetResourceUri"] == f"{endpoint}/deployments/blue"
    rules_out = blue["properties"]["profiles"][0]["rules"]
    assert {r["metricTrigger"]["metricResourceUri"] for r in rules_out} == {endpoint}
    eight_gpus = json.loads(subprocess.run([*command, "--deployment-file", str(ROOT / "deployments/nd96amsr-a100.yml")],
                                           capture_output=True, text=True, check=True).stdout)
    assert eight_gpus["properties"]["targetResourceUri"] == f"{endpoint}/deployments/nd96amsr-a100"
    assert eight_gpus["tags"][autoscale.CAPACITY_TAG] == "1280"
    assert [r["metricTrigger"]["threshold"] for r in eight_gpus["properties"]["profiles"][0]["rules"]] == [
        4 * r["metricTrigger"]["threshold"] for r in rules_out]
