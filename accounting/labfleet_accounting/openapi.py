"""The accounting service's API as an OpenAPI 3 document, served at ``api/openapi.json``.

Written as data; ``tests/unit/test_openapi.py`` keeps it true to the tornado
application: every route of :func:`labfleet_accounting.service.make_app` is a
path here with the methods its handler answers, and every path here is a route.
Paths are relative to the service prefix (``servers``).
"""

from __future__ import annotations


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _object(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"type": "object"}}}}  # fmt: skip


def _html(description: str) -> dict:
    return {"description": description,
            "content": {"text/html": {"schema": {"type": "string"}}}}  # fmt: skip


def _query(name: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "query", "required": False,
            "schema": schema or {"type": "string"}}  # fmt: skip


GROUP = {"name": "group", "in": "path", "required": True,
         "schema": {"type": "string", "pattern": "^[^/]+$"}}  # fmt: skip
PERIOD = _query("period", {"type": "string", "description": "2025-03, 2025-Q1, 2025 ..."})
SCOPE = [PERIOD, _query("user"), _query("group")]

AUTH_ERRORS = {
    "403": _error("the token lacks access:services!service=accounting, or the caller may "
                  "not see what it asked for"),
    "413": _error("the request body is over the service's limit (1 MiB)"),
}  # fmt: skip
QUOTA_ERRORS = {
    "400": _error("malformed, an unknown entry (accelerator), negative or above the cap: "
                  "the message names the field (quotas[i].nominalQuota)"),
    "403": _error("not an admin of the group (caps: not a platform admin)"),
    "404": _error("no quota management here (neither Kubernetes nor the local batch service), "
                  "or the group has no queue"),
    "413": AUTH_ERRORS["413"],
}  # fmt: skip

DOCUMENT: dict = {
    "openapi": "3.0.3",
    "info": {
        "title": "labfleet accounting service",
        "version": "1",
        "description": (
            "Usage, budgets and group quotas (docs/accounting.md). API requests carry a "
            "hub API token with access:services!service=accounting ('Authorization: "
            "token <token>'); browsers sign in through the hub. Errors are JSON: "
            '{"status": <code>, "message": "..."}. A request body over 1 MiB is '
            "answered with 413."
        ),
    },
    "servers": [{"url": "/services/accounting"}],
    "components": {
        "securitySchemes": {
            "hubToken": {"type": "apiKey", "in": "header", "name": "Authorization",
                         "description": "token <hub API token>"},
            "metricsToken": {"type": "http", "scheme": "bearer"},
        },
        "schemas": {
            "Error": {"type": "object", "required": ["status", "message"],
                      "properties": {"status": {"type": "integer"},
                                     "message": {"type": "string"}}},
            "Budget": {
                "type": "object", "required": ["gpu_hours"],
                "properties": {
                    "gpu_hours": {"type": "number", "minimum": 0},
                    "period": {"type": "string", "enum": ["month", "quarter", "year"]},
                    "warn_fraction": {"type": "number", "minimum": 0, "maximum": 1},
                    "enforce": {"type": "boolean"},
                },
            },
            "QuotaChanges": {
                "type": "object", "required": ["quotas"],
                "properties": {"quotas": {"type": "array", "items": {
                    "type": "object", "required": ["flavor", "resource"],
                    "additionalProperties": False,
                    "properties": {"flavor": {"type": "string"},
                                   "resource": {"type": "string"},
                                   "nominalQuota": {"type": "string"},
                                   "borrowingLimit": {"type": "string"}}}}},
            },
            "QuotaCaps": {
                "type": "object", "required": ["caps"],
                "properties": {"caps": {"type": "array", "items": {
                    "type": "object", "required": ["flavor", "resource", "max_nominal"],
                    "properties": {"flavor": {"type": "string"},
                                   "resource": {"type": "string"},
                                   "max_nominal": {"type": "string"},
                                   "max_borrowing": {"type": "string"}}}}},
            },
        },
    },
    "security": [{"hubToken": []}],
    "paths": {
        "/api/openapi.json": {
            "get": {"summary": "this document, no authentication", "security": [],
                    "responses": {"200": _object("the OpenAPI document")}},
        },
        "/api/usage": {
            "get": {
                "summary": "usage in a period, by user or group, as JSON or CSV",
                "parameters": [*SCOPE, _query("by", {"type": "string",
                                                     "enum": ["user", "group"]}),
                               _query("format", {"type": "string",
                                                 "enum": ["json", "csv"]})],
                "responses": {"200": {"description": "the usage rows",
                                      "content": {"application/json": {"schema": {
                                          "type": "object"}},
                                          "text/csv": {"schema": {"type": "string"}}}},
                              "400": _error("a period that cannot be read"), **AUTH_ERRORS},
            },
        },
        "/api/usage/series": {
            "get": {
                "summary": "usage over time, per bucket",
                "parameters": [*SCOPE, _query("bucket", {"type": "string",
                                                         "enum": ["hour", "day", "week"]}),
                               _query("metric")],
                "responses": {"200": _object("the series"),
                              "400": _error("a period or bucket that cannot be read"),
                              **AUTH_ERRORS},
            },
        },
        "/api/usage/recent": {
            "get": {
                "summary": "the latest sessions and jobs the caller may see, newest first",
                "parameters": SCOPE,
                "responses": {"200": _object("the recent sessions and jobs"),
                              "400": _error("a period that cannot be read"), **AUTH_ERRORS},
            },
        },
        "/api/budget/check": {
            "get": {
                "summary": "a group's budget decision for an accelerator kind",
                "parameters": [_query("group"), _query("accelerator_kind")],
                "responses": {"200": _object("the decision"), **AUTH_ERRORS},
            },
        },
        "/api/budgets/{group}": {
            "parameters": [GROUP],
            "put": {
                "summary": "set a group's GPU-hour budget (platform admins)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Budget"}}}},
                "responses": {"200": _object("the budget set"),
                              "400": _error("not a finite number of hours, period, ..."),
                              **AUTH_ERRORS},
            },
        },
        "/api/quotas/{group}": {
            "parameters": [GROUP],
            "get": {"summary": "a group's quotas (Kueue ClusterQueue, or the single node's "
                               "local batch limits)",
                    "responses": {"200": _object("the quotas"), **QUOTA_ERRORS}},
            "put": {
                "summary": "change a group's quotas (group admins, within the caps)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/QuotaChanges"}}}},
                "responses": {"200": _object("the quotas after"), **QUOTA_ERRORS},
            },
        },
        "/api/quota-caps/{group}": {
            "parameters": [GROUP],
            "get": {"summary": "the caps on a group's quotas",
                    "responses": {"200": _object("the caps"), **QUOTA_ERRORS}},
            "put": {
                "summary": "set the caps on a group's quotas (platform admins)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/QuotaCaps"}}}},
                "responses": {"200": _object("the caps after"), **QUOTA_ERRORS},
            },
        },
        "/api/audit": {
            "get": {"summary": "quota changes, newest first",
                    "parameters": [_query("group")],
                    "responses": {"200": _object("the audit entries"), **QUOTA_ERRORS}},
        },
        "/quotas": {
            "get": {"summary": "the quota page (HTML)", "parameters": [_query("group")],
                    "responses": {"200": _html("the page"), **QUOTA_ERRORS}},
            "post": {
                "summary": "the quota page's form",
                "parameters": [_query("group")],
                "requestBody": {"content": {"application/x-www-form-urlencoded": {
                    "schema": {"type": "object",
                               "additionalProperties": {"type": "string"}}}}},
                "responses": {"200": _html("the page, with what was saved"),
                              **QUOTA_ERRORS},
            },
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (Authorization: Bearer <metrics token>)",
                "security": [{"metricsToken": []}],
                "responses": {"200": {"description": "Prometheus text",
                                      "content": {"text/plain": {"schema": {
                                          "type": "string"}}}},
                              "401": {"description": "no bearer token"},
                              "403": {"description": "another token, or metrics closed"}},
            },
        },
        "/oauth_callback": {
            "get": {"summary": "the hub's OAuth callback for browser logins", "security": [],
                    "responses": {"302": {"description": "back to the page"}}},
        },
        "/": {
            "get": {"summary": "the usage page (HTML; hub login)",
                    "parameters": SCOPE, "responses": {"200": _html("the page")}},
        },
    },
}  # fmt: skip
