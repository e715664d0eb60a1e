"""A JSON schema for the part of prometheus-operator's ServiceMonitor (monitoring.coreos.com/v1)
that k8s/servicemonitor.yaml uses, since `kubernetes-validate` bundles only the built-in kinds.

Written from the operator's API reference (ServiceMonitorSpec, Endpoint, NamespaceSelector) and
kept strict: an unknown or misspelt field is an error here, although the real CRD would accept
some of the operator's other fields. `metadata` and `selector` are checked against the
Kubernetes definitions that kubernetes-validate ships (ObjectMeta, LabelSelector), so they
follow the same Kubernetes version as every other manifest.
"""

from importlib.resources import files
from typing import Any

import jsonschema
import orjson
from referencing import Registry, Resource

_META = "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."

DURATION_PATTERN = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
"""Prometheus duration, as the CRD's `interval` and `scrapeTimeout` patterns define it."""

SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://kubernetes.io/api/servicemonitor-monitoring-v1.json",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"$ref": _META + "ObjectMeta"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"$ref": _META + "LabelSelector"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION_PATTERN},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION_PATTERN},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def validate_service_monitor(resource: dict[str, Any], kubernetes_version: str) -> None:
    """Validate a ServiceMonitor against `SERVICE_MONITOR_SCHEMA`, with the strict Kubernetes
    definitions of `kubernetes_version` (e.g. "1.30") that kubernetes-validate ships.
    Raises jsonschema.ValidationError."""
    folder = f"v{kubernetes_version}.0-local-strict"
    definitions = files("kubernetes_validate") / "kubernetes-json-schema" / folder
    contents = orjson.loads((definitions / "_definitions.json").read_bytes())
    registry: Registry[Any] = Resource.from_contents(contents) @ Registry()
    jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA, registry=registry).validate(resource)
