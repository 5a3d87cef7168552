"""JSON schemas for the two custom resources tureen ships, from their CRDs' field lists.

``kubernetes-validate`` knows only built-in kinds, so KEDA's ScaledObject (keda.sh/v1alpha1, KEDA
2.x) and the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) are checked against
these: the spec fields each CRD defines (as documented at keda.sh/docs/latest/reference/scaledobject-spec
and in prometheus-operator's API reference), with unknown fields rejected so a misspelt key fails,
and the Prometheus scaler's metadata keys (keda.sh/docs/latest/scalers/prometheus).
"""

from __future__ import annotations

_METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}

_STRING_NUMBER = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$"}

PROMETHEUS_TRIGGER_METADATA = {
    "type": "object",
    "required": ["serverAddress", "query", "threshold"],
    "additionalProperties": False,
    "properties": {
        "serverAddress": {"type": "string", "pattern": "^https?://"},
        "query": {"type": "string", "minLength": 1},
        "threshold": _STRING_NUMBER,
        "activationThreshold": _STRING_NUMBER,
        "namespace": {"type": "string"},
        "customHeaders": {"type": "string"},
        "ignoreNullValues": {"type": "string", "enum": ["true", "false"]},
        "queryParameters": {"type": "string"},
        "unsafeSsl": {"type": "string", "enum": ["true", "false"]},
        "timeout": {"type": "string"},
        "authModes": {"type": "string"},
    },
}

SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                             "properties": {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"},
                                            "behavior": {"type": "string"}}},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"name": {"type": "string"},
                                                                     "behavior": {"type": "object"}}},
                    "scalingModifiers": {"type": "object"}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                   "metadata": {"type": "object"},
                                   "authenticationRef": {"type": "object"},
                                   "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                   "useCachedMetrics": {"type": "boolean"}},
                    "if": {"properties": {"type": {"const": "prometheus"}}},
                    "then": {"properties": {"metadata": PROMETHEUS_TRIGGER_METADATA}}}},
            },
        },
    },
}

_ENDPOINT = {"type": "object", "additionalProperties": False, "properties": {
    "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]}, "path": {"type": "string"},
    "scheme": {"enum": ["http", "https"]}, "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
    "scrapeTimeout": {"type": "string"}, "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"}, "params": {"type": "object"},
    "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"},
    "bearerTokenSecret": {"type": "object"}, "authorization": {"type": "object"},
    "tlsConfig": {"type": "object"}, "basicAuth": {"type": "object"}, "followRedirects": {"type": "boolean"}}}

SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "matchExpressions": {"type": "array"}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                "jobLabel": {"type": "string"}, "targetLabels": {"type": "array"},
                "podTargetLabels": {"type": "array"}, "sampleLimit": {"type": "integer"},
            },
        },
    },
}

CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
               ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR}
