"""The OpenAPI 3.1 description of the server's JSON (and byte) routes, written by hand."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

HEX32 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
UINT = {"type": "integer", "minimum": 0}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


def _q(
    name: str, description: str, *, required: bool = False, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema or UINT,
    }


BAD_REQUEST = _problem("Malformed query parameters (bad-request)")

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details; type is urn:writ:problem:<name>",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "pattern": "^urn:writ:problem:[a-z-]+$"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "seq": UINT,
            "size": UINT,
            "root": HEX32,
        },
        "additionalProperties": True,
    },
    "AppendResult": {
        "type": "object",
        "required": ["size", "root", "appended", "first_seq"],
        "properties": {"size": UINT, "root": HEX32, "appended": UINT, "first_seq": UINT},
    },
    "Ledger": {
        "type": "object",
        "required": ["origin", "anchor", "size", "root", "log_public_key", "log_vkey", "cosig_vkey"],
        "properties": {
            "origin": {"type": "string"},
            "anchor": HEX32,
            "size": UINT,
            "root": HEX32,
            "log_public_key": HEX32,
            "log_vkey": {"type": "string"},
            "cosig_vkey": {"type": "string"},
            "checkpoint_time": UINT,
            # (witness) each witness of `writ serve --witness URL` (docs/witness.md)
            "witnesses": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["url", "state", "granted"],
                    "properties": {
                        "url": {"type": "string"},
                        "name": {"type": ["string", "null"]},
                        "state": {
                            "enum": [
                                "pending",
                                "ok",
                                "down",
                                "refused",
                                "conflict",
                                "ahead",
                                "ungranted",
                                "error",
                            ]
                        },
                        "granted": {"type": "boolean"},
                        "size": {"type": ["integer", "null"], "minimum": 0},
                        "cosigned_size": {"type": ["integer", "null"], "minimum": 0},
                        "cosigned_at": {"type": ["integer", "null"], "minimum": 0},
                        "age": {"type": ["integer", "null"], "minimum": 0},
                        "error": {"type": ["string", "null"]},
                    },
                },
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["ok", "size"],
        "properties": {"ok": {"type": "boolean"}, "size": UINT},
    },
    "ReceiptAccepted": {
        "type": "object",
        "required": ["accepted", "device_grant_seq", "size"],
        "properties": {"accepted": {"type": "boolean"}, "device_grant_seq": UINT, "size": UINT},
    },
    "Revocation": {
        "type": ["object", "null"],
        "properties": {
            "seq": UINT,
            "reason": {"type": "string"},
            "time": UINT,
            "signer": UINT,
            "by": {"type": "string", "enum": ["id", "key"]},
        },
    },
    "Credential": {
        "type": "object",
        "required": ["seq", "name", "role", "scope", "subject", "status", "revocation", "record"],
        "properties": {
            "seq": UINT,
            "name": {"type": "string"},
            "role": {"type": "string"},
            "scope": {"type": "string"},
            "subject": HEX32,
            "not_before": UINT,
            "not_after": UINT,
            "granted_at": UINT,
            "status": {"type": "string", "enum": ["active", "revoked", "expired", "not-yet-valid"]},
            "revocation": _ref("Revocation"),
            "record": {"type": ["string", "null"], "pattern": "^[0-9a-f]*$"},
        },
    },
    "CredentialList": {
        "type": "object",
        "required": ["credentials"],
        "properties": {"credentials": {"type": "array", "items": _ref("Credential")}, "total": UINT},
    },
    "Device": {
        "type": "object",
        "required": ["grant_seq", "name", "public_key", "revoked"],
        "properties": {
            "grant_seq": UINT,
            "name": {"type": "string"},
            "public_key": HEX32,
            "scope": {"type": "string"},
            "size": {"type": ["integer", "null"]},
            "root": {"type": ["string", "null"]},
            "time": {"type": ["integer", "null"]},
            "received_at": {"type": ["integer", "null"]},
            "revoked": {"type": "boolean"},
        },
    },
    "Straggler": {
        "type": "object",
        "properties": {
            "grant_seq": UINT,
            "name": {"type": "string"},
            "size": {"type": ["integer", "null"]},
            "received_at": {"type": ["integer", "null"]},
        },
    },
    "RevocationSpread": {
        "type": "object",
        "required": ["seq", "target", "reason", "applied", "total", "stragglers"],
        "properties": {
            "seq": UINT,
            "target": {"oneOf": [UINT, HEX32]},
            "name": {"type": ["string", "null"]},
            "reason": {"type": "string"},
            "time": UINT,
            "signer": UINT,
            "applied": UINT,
            "total": UINT,
            "stragglers": {"type": "array", "items": _ref("Straggler")},
            "stragglers_total": UINT,
            "stragglers_next": {"type": ["string", "null"]},
            "stragglers_url": {"type": "string"},
        },
    },
    "Fleet": {
        "type": "object",
        "required": ["devices", "revocations"],
        "properties": {
            "devices": {"type": "array", "items": _ref("Device")},
            "devices_total": UINT,
            "active_devices": UINT,
            "next": {"type": ["integer", "null"]},
            "revocations": {"type": "array", "items": _ref("RevocationSpread")},
            "revocations_total": UINT,
        },
    },
    "InclusionProof": {
        "type": "object",
        "required": ["index", "size", "root", "proof"],
        "properties": {
            "index": UINT,
            "size": UINT,
            "root": HEX32,
            "leaf_hash": HEX32,
            "proof": {"type": "array", "items": HEX32},
        },
    },
    "ConsistencyProof": {
        "type": "object",
        "required": ["old", "new", "old_root", "new_root", "proof"],
        "properties": {
            "old": UINT,
            "new": UINT,
            "old_root": HEX32,
            "new_root": HEX32,
            "proof": {"type": "array", "items": HEX32},
        },
    },
}

_BYTES = {"type": "string", "contentMediaType": "application/octet-stream"}
_MSGPACK = {"application/msgpack": {"schema": {"type": "string", "contentMediaType": "application/msgpack"}}}

_PATHS: dict[str, Any] = {
    "/checkpoint": {
        "get": {
            "summary": "The signed checkpoint (C2SP tlog-checkpoint, 0x01 and 0x04 signatures)",
            "operationId": "getCheckpoint",
            "responses": {
                "200": {"description": "The note", "content": {"text/plain": {"schema": {"type": "string"}}}}
            },
        }
    },
    "/tile/{path}": {
        "get": {
            "summary": "C2SP tlog-tiles hash tile or entry bundle",
            "operationId": "getTile",
            "parameters": [
                {
                    "name": "path",
                    "in": "path",
                    "required": True,
                    "description": "<L>/<N>[.p/<W>] or entries/<N>[.p/<W>]",
                    "schema": {"type": "string"},
                }
            ],
            "responses": {
                "200": {
                    "description": "The tile",
                    "content": {"application/octet-stream": {"schema": _BYTES}},
                },
                "404": _problem("No such tile (bad-tile-path)"),
            },
        }
    },
    "/v1/records": {
        "post": {
            "summary": "Append 1..1000 records, all or nothing, durably",
            "operationId": "appendRecords",
            "requestBody": {"required": True, "content": _MSGPACK},
            "responses": {
                "200": _json(_ref("AppendResult")),
                "400": _problem("Malformed body"),
                "403": _problem("bad-signature, unauthorized-signer"),
                "409": _problem("stale-head (with the current size and root), already-revoked"),
                "413": _problem("payload-too-large, too-large"),
                "415": _problem("unsupported-media-type"),
                "422": _problem("A rule of docs/protocol.md, 'Validity rules'"),
                "429": _problem("rate-limited (see Retry-After)"),
                "503": _problem("storage-error, overloaded"),
            },
        },
        "get": {
            "summary": "Record bytes as a MessagePack array of bin",
            "operationId": "readRecords",
            "parameters": [
                _q("start", "First seq (default 0)"),
                _q("limit", "At most this many (1..1000, default 1000)"),
            ],
            "responses": {"200": {"description": "The records", "content": _MSGPACK}, "400": BAD_REQUEST},
        },
    },
    "/v1/ledger": {
        "get": {
            "summary": "Identity, head and log keys",
            "operationId": "getLedger",
            "responses": {"200": _json(_ref("Ledger"))},
        }
    },
    "/v1/events": {
        "get": {
            "summary": "Server-Sent Events: a checkpoint event per new checkpoint",
            "operationId": "events",
            "parameters": [
                _q("since", "Tree size the client has (like Last-Event-ID)"),
                _q(
                    "records",
                    "1: also send the missing records",
                    schema={"type": "string", "enum": ["0", "1"]},
                ),
                _q(
                    "format",
                    "compact (a Writ extension): one unnamed event per checkpoint, id the tree size, "
                    'data ["<base85 entry bundle>", "<note>"] or, after the first, "<base85 blob>" '
                    "(the root and signature payloads that changed since the stream's previous note, "
                    "then the records); the records are those ending at the size, up to 256",
                    schema={"type": "string", "enum": ["standard", "compact"], "default": "standard"},
                ),
            ],
            "responses": {
                "200": {
                    "description": "The stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "503": _problem("overloaded: too many streams"),
            },
        }
    },
    "/v1/receipts": {
        "post": {
            "summary": "A device's signed receipt of the head it applied",
            "operationId": "postReceipt",
            "requestBody": {"required": True, "content": _MSGPACK},
            "responses": {
                "200": _json(_ref("ReceiptAccepted")),
                "403": _problem("bad-signature, unknown-device"),
                "422": _problem("bad-message, unknown-head"),
                "415": _problem("unsupported-media-type"),
                "429": _problem("rate-limited"),
            },
        }
    },
    "/v1/credentials": {
        "get": {
            "summary": "Credentials by name, subject and/or role",
            "operationId": "listCredentials",
            "parameters": [
                _q("name", "Grant name", schema={"type": "string"}),
                _q("subject", "Subject public key (hex)", schema=HEX32),
                _q("role", "Role", schema={"type": "string"}),
                _q("limit", "At most this many (1..1000)"),
            ],
            "responses": {"200": _json(_ref("CredentialList")), "400": BAD_REQUEST},
        }
    },
    "/v1/credentials/{seq}": {
        "get": {
            "summary": "The credential granted at seq, and its status",
            "operationId": "getCredential",
            "parameters": [{"name": "seq", "in": "path", "required": True, "schema": UINT}],
            "responses": {
                "200": _json(_ref("Credential")),
                "400": BAD_REQUEST,
                "404": _problem("not-found: no grant at that seq"),
            },
        }
    },
    "/v1/fleet": {
        "get": {
            "summary": "A page of devices with their latest receipts; how far each revocation has spread",
            "operationId": "getFleet",
            "parameters": [
                _q("limit", "Devices on this page (1..1000, default 1000)"),
                _q("after", "Devices after this grant seq (the previous page's next)"),
                _q("revocations", "Newest revocations to report (0..100, default 50)"),
                _q("stragglers", "Stragglers listed per revocation (0..20, default 20)"),
            ],
            "responses": {
                "200": _json(_ref("Fleet")),
                "400": BAD_REQUEST,
                "429": _problem("rate-limited: a report (see Retry-After)"),
            },
        }
    },
    "/v1/fleet/revocations/{seq}": {
        "get": {
            "summary": "One revocation's spread, with a page of its stragglers (furthest behind first)",
            "operationId": "getRevocationSpread",
            "parameters": [
                {"name": "seq", "in": "path", "required": True, "schema": UINT},
                _q("stragglers", "Stragglers on this page (1..100, default 100)"),
                _q("after", "The previous page's stragglers_next cursor", schema={"type": "string"}),
            ],
            "responses": {
                "200": _json(_ref("RevocationSpread")),
                "400": BAD_REQUEST,
                "404": _problem("not-found: no revocation at that seq"),
                "429": _problem("rate-limited: a report (see Retry-After)"),
            },
        }
    },
    "/v1/proof/inclusion": {
        "get": {
            "summary": "Inclusion proof (JSON; text/plain: C2SP tlog-proof for the current checkpoint)",
            "operationId": "inclusionProof",
            "parameters": [
                _q("index", "Leaf index", required=True),
                _q("size", "Tree size (default: the checkpoint's)"),
            ],
            "responses": {"200": _json(_ref("InclusionProof")), "400": BAD_REQUEST},
        }
    },
    "/v1/proof/consistency": {
        "get": {
            "summary": "Consistency proof (JSON; text/plain: one base64 hash per line)",
            "operationId": "consistencyProof",
            "parameters": [
                _q("old", "Old size (>= 1)", required=True),
                _q("new", "New size (default: the checkpoint's)"),
            ],
            "responses": {"200": _json(_ref("ConsistencyProof")), "400": BAD_REQUEST},
        }
    },
    "/healthz": {
        "get": {"summary": "Liveness", "operationId": "healthz", "responses": {"200": _json(_ref("Health"))}}
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {
                "200": {
                    "description": "Text exposition",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
}


@cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Writ ledger server",
            "version": "1",
            "description": "Revocation ledger: C2SP checkpoints and tiles, record appends, receipts, "
            "fleet view. "
            "Errors are RFC 9457 application/problem+json with type urn:writ:problem:<name>.",
        },
        "paths": _PATHS,
        "components": {"schemas": _SCHEMAS},
    }


def openapi_document() -> dict[str, Any]:
    return copy.deepcopy(_document())
