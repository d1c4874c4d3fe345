"""The batch service's API as an OpenAPI 3 document, served at ``api/openapi.json``.

Written as data; ``tests/unit/test_openapi.py`` keeps it true to the tornado
application: every route of :func:`labfleet_batch.service.make_app` is a path
here with the methods its handler answers, and every path here is a route.
Paths are relative to the service prefix (``servers``).
"""

from __future__ import annotations

from .validation import FIELDS, Limits

_LIMITS = Limits()

JOB_GROUP = {"name": "group", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"}}  # fmt: skip
JOB_NAME = {"name": "name", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^[a-z0-9][-a-z0-9]{0,62}$"}}  # fmt: skip


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, ref: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


AUTH_ERRORS = {
    "401": _error("no hub API token"),
    "403": _error("the hub does not accept the token, or it lacks a scope"),
    "413": _error("the request body is over the service's limit (1 MiB)"),
}

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

SUBMISSION = {
    "type": "object",
    "description": "A submission: exactly one of command or script. Unknown fields: 400.",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"},
        "command": {"type": "array", "items": {"type": "string"},
                    "maxItems": _LIMITS.max_command_args},
        "script": {"type": "string"},
        "files": _STRING_MAP,
        "env": _STRING_MAP,
        "group": {"type": "string"},
        "profile": {"type": "string"},
        "image": {"type": "string"},
        "size": {"type": "string"},
        "count": {"type": "integer", "minimum": 0},
        "accelerator": {"type": "string"},
        "completions": {"type": "integer", "minimum": 1, "maximum": _LIMITS.max_completions},
        "parallelism": {"type": "integer", "minimum": 1, "maximum": _LIMITS.max_parallelism},
        "max_run_time": {"type": "integer", "minimum": _LIMITS.min_run_time,
                         "maximum": _LIMITS.max_run_time},
        "priority": {"type": "string"},
        "offload": {"type": "boolean"},
    },
}  # fmt: skip
assert set(SUBMISSION["properties"]) == set(FIELDS)

JOB = {
    "type": "object",
    "required": ["id", "name", "group", "user", "state"],
    "properties": {
        "id": {"type": "string", "description": "<group>/<name>"},
        "name": {"type": "string"},
        "group": {"type": "string"},
        "user": {"type": "string"},
        "state": {"type": "string",
                  "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
        "queue": {"type": "object", "description": "admission state and queue position"},
    },
}  # fmt: skip

DOCUMENT: dict = {
    "openapi": "3.0.3",
    "info": {
        "title": "labfleet batch service",
        "version": "1",
        "description": (
            "Batch jobs from notebooks into the groups' queues (docs/batch.md). Every "
            "api/ request but this document carries a hub API token with "
            "access:services!service=batch: 'Authorization: token <token>'. Errors are "
            'JSON: {"status": <code>, "message": "<what was wrong and what is allowed>"}. '
            "A request body over 1 MiB is answered with 413; a job the caller may not "
            "see answers 404, exactly as a missing one."
        ),
    },
    "servers": [{"url": "/services/batch"}],
    "components": {
        "securitySchemes": {
            "hubToken": {"type": "apiKey", "in": "header", "name": "Authorization",
                         "description": "token <hub API token>"},
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["status", "message"],
                "properties": {"status": {"type": "integer"}, "message": {"type": "string"}},
            },
            "Submission": SUBMISSION,
            "Job": JOB,
            "LimitChanges": {
                "type": "object", "required": ["quotas"],
                "properties": {"quotas": {"type": "array", "items": {
                    "type": "object", "required": ["flavor", "resource"],
                    "properties": {"flavor": {"type": "string"}, "resource": {"type": "string"},
                                   "nominalQuota": {"type": "string"}}}}},
            },
            "Limits": {
                "type": "object", "required": ["group", "quotas", "configured", "in_use"],
                "properties": {"group": {"type": "string"},
                               "quotas": {"type": "array", "items": {"type": "object"}},
                               "configured": {"type": "array", "items": {"type": "object"}},
                               "in_use": {"type": "array", "items": {"type": "object"}},
                               "before": {"type": "array", "items": {"type": "object"}}},
            },
            "Jobs": {"type": "object", "required": ["jobs"],
                     "properties": {"jobs": {"type": "array",
                                             "items": {"$ref": "#/components/schemas/Job"}}}},
            "Info": {"type": "object",
                     "required": ["user", "groups", "priorities", "limits"],
                     "properties": {
                         "user": {"type": "string"},
                         "groups": {"type": "object"},
                         "admin_of": {"type": "array", "items": {"type": "string"}},
                         "priorities": {"type": "array", "items": {"type": "string"}},
                         "default_priority": {"type": "string"},
                         "offload": {"type": "boolean"},
                         "limits": {"type": "object"},
                     }},
        },
    },  # fmt: skip
    "security": [{"hubToken": []}],
    "paths": {
        "/health": {
            "get": {
                "summary": "liveness, no authentication",
                "security": [],
                "responses": {"200": {"description": "ok",
                                      "content": {"application/json": {"schema": {
                                          "type": "object"}}}}},
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "this document, no authentication",
                "security": [],
                "responses": {"200": {"description": "the OpenAPI document",
                                      "content": {"application/json": {"schema": {
                                          "type": "object"}}}}},
            }
        },
        "/api/info": {
            "get": {
                "summary": "what the caller may submit: groups, priorities, limits",
                "responses": {"200": _json("the caller's groups and limits", "Info"),
                              **AUTH_ERRORS},
            }
        },
        "/api/jobs": {
            "get": {
                "summary": "own jobs; with group, a group admin sees all of the group's",
                "parameters": [{"name": "group", "in": "query", "required": False,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json("jobs", "Jobs"), **AUTH_ERRORS},
            },
            "post": {
                "summary": "submit a job",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Submission"}}}},
                "responses": {
                    "201": _json("created (with budget and warning when a budget applies)",
                                 "Job"),
                    "400": _error("refused: the message names the field and what is allowed"),
                    **AUTH_ERRORS,
                    "429": _error("the caller (max_waiting_per_user) or the group "
                                  "(max_waiting_per_group) has as many jobs waiting as its "
                                  "cap; nothing was created"),
                    "503": _error("users cannot be isolated, or the budget is unavailable"),
                },
            },
        },
        "/api/jobs/{group}/{name}": {
            "parameters": [JOB_GROUP, JOB_NAME],
            "get": {
                "summary": "a job's status, with admission state and queue position",
                "responses": {"200": _json("the job", "Job"),
                              "404": _error("no job that the caller may see"),
                              **AUTH_ERRORS},
            },
            "delete": {
                "summary": "cancel a job",
                "responses": {"200": _json("the cancelled job", "Job"),
                              "404": _error("no job that the caller may see"),
                              **AUTH_ERRORS},
            },
        },
        "/api/jobs/{group}/{name}/logs": {
            "parameters": [JOB_GROUP, JOB_NAME],
            "get": {
                "summary": "a completion's log (text); follow=1 streams it to the end",
                "parameters": [
                    {"name": "index", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 0}},
                    {"name": "follow", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": ["0", "1", "true", "yes"]}},
                ],
                "responses": {"200": {"description": "the log",
                                      "content": {"text/plain": {"schema": {
                                          "type": "string"}}}},
                              "400": _error("no such completion index"),
                              "404": _error("no job that the caller may see"),
                              "409": _error("the log cannot be read safely"),
                              **AUTH_ERRORS},
            },
        },
        "/api/limits/{group}": {
            "parameters": [JOB_GROUP],
            "get": {
                "summary": "a group's live limits on a single node (the accounting service "
                           "only: labfleet_batch.limits_api)",
                "responses": {"200": _json("the limits, the YAML's, what is in use",
                                           "Limits"),
                              "404": _error("no such group, or not the local backend"),
                              **AUTH_ERRORS},
            },
            "put": {
                "summary": "change a group's limits at once (the accounting service only)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/LimitChanges"}}}},
                "responses": {"200": _json("the limits after, with before", "Limits"),
                              "400": _error("malformed, or no such entry; names the field"),
                              "404": _error("no such group, or not the local backend"),
                              "503": _error("the limits could not be saved"),
                              **AUTH_ERRORS},
            },
        },
        "/jobs/{group}/{name}": {
            "parameters": [JOB_GROUP, JOB_NAME],
            "get": {
                "summary": "a job's page (HTML; hub login)",
                "responses": {"200": {"description": "the page",
                                      "content": {"text/html": {"schema": {
                                          "type": "string"}}}}},
            },
        },
        "/": {
            "get": {
                "summary": "the queue page (HTML; hub login)",
                "responses": {"200": {"description": "the page",
                                      "content": {"text/html": {"schema": {
                                          "type": "string"}}}}},
            }
        },
        "/oauth_callback": {
            "get": {
                "summary": "the hub's OAuth callback for the pages' browser login",
                "security": [],
                "responses": {"302": {"description": "back to the page"}},
            }
        },
    },
}  # fmt: skip
