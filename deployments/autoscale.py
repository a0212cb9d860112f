"""Apply deployments/autoscale.json, an Azure Monitor autoscale setting, to a managed online deployment.

    python deployments/autoscale.py --subscription <id> --resource-group <rg> --workspace <ws> \\
        --location <region> [--deployment-file deployment.yml] [--dry-run]

The endpoint and deployment names come from the deployment file; their ARM ids fill the file's
`{endpoint_id}` and `{deployment_id}`. The rules' thresholds are written for the capacity in the file's
`max_concurrent_requests_per_instance` tag (deployment.yml's 256 generating + 64 waiting); for a
deployment file of another capacity (an 8-GPU file's 4 replicas: 1280) they are scaled by the ratio.
`--dry-run` prints the setting as it would be sent and touches nothing. Why this signal and these
numbers: docs/deploying.md, "Autoscale".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from azure.mgmt.monitor.models import AutoscaleSettingResource

HERE = Path(__file__).resolve().parent
RULES = HERE / "autoscale.json"
CAPACITY_TAG = "max_concurrent_requests_per_instance"


def arm_ids(*, subscription: str, resource_group: str, workspace: str, endpoint: str,
            deployment: str) -> dict[str, str]:
    """The ARM ids of an online endpoint and one of its deployments (the autoscale target)."""
    workspace_id = (f"/subscriptions/{subscription}/resourceGroups/{resource_group}"
                    f"/providers/Microsoft.MachineLearningServices/workspaces/{workspace}")
    endpoint_id = f"{workspace_id}/onlineEndpoints/{endpoint}"
    return {"endpoint_id": endpoint_id, "deployment_id": f"{endpoint_id}/deployments/{deployment}"}


def autoscale_setting(rules: dict, deployment: dict, *, location: str, ids: dict[str, str],
                      name: str) -> AutoscaleSettingResource:
    """The setting for one deployment (its YAML as a dict): ids and location filled, thresholds at its capacity."""
    text = json.dumps(rules)
    for key, value in {**ids, "location": location}.items():
        text = text.replace("{" + key + "}", value)
    body = json.loads(text)
    body["properties"]["name"] = name
    capacity = deployment["request_settings"]["max_concurrent_requests_per_instance"]
    ratio = capacity / int(body["tags"][CAPACITY_TAG])
    body["tags"][CAPACITY_TAG] = str(capacity)
    for profile in body["properties"]["profiles"]:
        for rule in profile["rules"]:
            if rule["metricTrigger"].get("dividePerInstance"):  # a per-instance load: it grows with capacity
                rule["metricTrigger"]["threshold"] = round(rule["metricTrigger"]["threshold"] * ratio)
    return AutoscaleSettingResource.from_dict(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscription", required=True)
    parser.add_argument("--resource-group", required=True)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--location", required=True, help="the workspace's region, e.g. eastus")
    parser.add_argument("--deployment-file", type=Path, default=HERE.parent / "deployment.yml")
    parser.add_argument("--rules", type=Path, default=RULES)
    parser.add_argument("--name", help="the autoscale setting's name (default <endpoint>-<deployment>-autoscale)")
    parser.add_argument("--dry-run", action="store_true", help="print the setting; send nothing")
    args = parser.parse_args(argv)

    deployment = yaml.safe_load(args.deployment_file.read_text())
    endpoint, name = deployment["endpoint_name"], deployment["name"]
    ids = arm_ids(subscription=args.subscription, resource_group=args.resource_group, workspace=args.workspace,
                  endpoint=endpoint, deployment=name)
    setting_name = args.name or f"{endpoint}-{name}-autoscale"
    setting = autoscale_setting(json.loads(args.rules.read_text()), deployment, location=args.location, ids=ids,
                                name=setting_name)
    if args.dry_run:
        json.dump(setting.serialize(), sys.stdout, indent=2)
        print()
        return 0

    from azure.identity import DefaultAzureCredential
    from azure.mgmt.monitor import MonitorManagementClient

    client = MonitorManagementClient(DefaultAzureCredential(), args.subscription)
    applied = client.autoscale_settings.create_or_update(args.resource_group, setting_name, setting)
    print(f"{applied.id}: {len(applied.profiles[0].rules)} rules on {ids['deployment_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
