#!/usr/bin/env python3
"""A small, in-memory, Confluent-Schema-Registry-compatible HTTP server for tests.

Standard library only (``http.server`` + threading). AVRO schemas are checked on
register/lookup by a small structural validator (names, fields, symbols, known type
references) and, if ``fastavro`` happens to be importable, by fastavro's parser too;
a failure is 422/42201. References to other subjects are stored but not resolved.

Usage:
    python3 tests/support/registry.py [--host 127.0.0.1] [--port 0]
        [--user U --password P] [--register SUBJECT=FILE.avsc ...]
        [--always-schema-type] [--exit-on-stdin-eof] [--quiet]

With --port 0 (the default) a free port is picked. In every case the FIRST line on
stdout is ``LISTENING <port>`` (flushed), printed once the socket accepts
connections; pre-registered subjects (--register) are in place before it.
SIGTERM / SIGINT stop the server with exit code 0. Bad arguments exit 2.

Implemented (Confluent REST subset, bodies ``application/vnd.schemaregistry.v1+json``):
    GET  /                                   -> {}
    GET  /config                             -> {"compatibilityLevel": "..."}
    PUT  /config                             -> {"compatibility": "..."}
    GET  /config/{subject}                   -> 404/40408 unless set by PUT
    PUT  /config/{subject}
    GET  /schemas/types                      -> ["AVRO","JSON","PROTOBUF"]
    GET  /schemas/ids/{id}                   -> {"schema": "...", "schemaType"?: ...}
    GET  /schemas/ids/{id}/schema            -> the raw schema (JSON, not a string)
    GET  /schemas/ids/{id}/subjects          -> ["s", ...]
    GET  /schemas/ids/{id}/versions          -> [{"subject": s, "version": v}, ...]
    GET  /subjects                           -> ["s", ...]
    GET  /subjects/{subject}/versions        -> [1, 2, ...]
    GET  /subjects/{subject}/versions/{v}    -> {"subject","version","id","schema","schemaType"?}
                                                (v = n, "latest" or -1)
    GET  /subjects/{subject}/versions/{v}/schema -> the raw schema
    POST /subjects/{subject}/versions        -> {"id": n}       (register, idempotent)
    POST /subjects/{subject}                 -> {"subject","version","id","schema"} (lookup)
    DELETE /subjects/{subject}               -> [versions]       (hard delete, for tests)

Behaviour that mirrors the real server:
  * ids are global and increase from 1; the same schema (same type, same JSON after
    whitespace-insensitive canonicalisation) gets the same id in every subject, and
    registering it again under a subject returns the existing id (no new version).
  * a missing "schemaType" means AVRO; for AVRO schemas "schemaType" is omitted from
    responses (as in Confluent's documented examples, so clients must default it)
    unless --always-schema-type is given.
  * errors are {"error_code": n, "message": "..."}: 40401 subject not found, 40402
    version not found, 40403 schema not found, 42201 invalid schema, 42202 invalid
    version, 401 unauthorized (with WWW-Authenticate: Basic), 404 for unknown paths.
  * query strings (?normalize=, ?deleted=, ?subject=, ?format=) are accepted and ignored.
  * no compatibility checks: any valid schema may be registered (config says NONE).

Test-only endpoints (not part of the Confluent API; also behind basic auth):
    GET    /__test/requests   -> [{"method","path","status"}, ...]  (every request so far)
    DELETE /__test/requests   -> clears that log
    POST   /__test/faults     body {"status": 503, "error_code": 50003, "count": 2,
                                    "path_prefix": "/schemas/ids/", "method": "GET",
                                    "delay_ms": 0, "message": "...",
                                    "replace": false}   (all optional)
                              -> the next `count` matching requests get that error
                                 (defaults: status 503, error_code = status, count 1,
                                 any path/method; count -1 = until cleared;
                                 status 0 = only the delay; replace: true
                                 clears the others in the same step)
    DELETE /__test/faults     -> clears all faults
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
SCHEMA_TYPES = ("AVRO", "JSON", "PROTOBUF")

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_avro(schema, names: set, namespace: str = "") -> None:
    """A small structural Avro check (stdlib only): enough for 42201 on broken schemas."""
    if isinstance(schema, str):
        full = schema if "." in schema or not namespace else f"{namespace}.{schema}"
        if schema not in PRIMITIVES and schema not in names and full not in names:
            raise ValueError(f"unknown type {schema!r}")
        return
    if isinstance(schema, list):
        if not schema:
            raise ValueError("empty union")
        for branch in schema:
            if isinstance(branch, list):
                raise ValueError("a union may not directly contain a union")
            _check_avro(branch, names, namespace)
        return
    if not isinstance(schema, dict) or "type" not in schema:
        raise ValueError("a schema object needs a \"type\"")
    t = schema["type"]
    if t in ("record", "error", "enum", "fixed"):
        name = schema.get("name")
        if not isinstance(name, str) or not all(NAME_RE.match(p) for p in name.split(".")):
            raise ValueError(f"{t} needs a valid \"name\", got {name!r}")
        ns = schema.get("namespace", namespace) or ""
        full = name if "." in name or not ns else f"{ns}.{name}"
        if "." in name:
            ns = name.rsplit(".", 1)[0]
        names.add(full)
        if t == "enum":
            symbols = schema.get("symbols")
            if not isinstance(symbols, list) or not all(isinstance(x, str) and NAME_RE.match(x) for x in symbols) \
                    or len(set(symbols)) != len(symbols):
                raise ValueError(f"enum {name}: \"symbols\" must be unique names")
        elif t == "fixed":
            if not isinstance(schema.get("size"), int) or schema["size"] < 0:
                raise ValueError(f"fixed {name}: needs an integer \"size\"")
        else:
            fields = schema.get("fields")
            if not isinstance(fields, list):
                raise ValueError(f"record {name}: needs a \"fields\" array")
            seen = set()
            for f in fields:
                if not isinstance(f, dict) or not isinstance(f.get("name"), str) or "type" not in f:
                    raise ValueError(f"record {name}: each field needs \"name\" and \"type\"")
                if not NAME_RE.match(f["name"]) or f["name"] in seen:
                    raise ValueError(f"record {name}: bad or duplicate field name {f['name']!r}")
                seen.add(f["name"])
                _check_avro(f["type"], names, ns)
        return
    if t == "array":
        if "items" not in schema:
            raise ValueError("array needs \"items\"")
        _check_avro(schema["items"], names, namespace)
        return
    if t == "map":
        if "values" not in schema:
            raise ValueError("map needs \"values\"")
        _check_avro(schema["values"], names, namespace)
        return
    _check_avro(t, names, namespace)  # {"type": "long", "logicalType": ...} or a named ref


try:  # optional: fastavro's stricter parser when it is importable
    import fastavro  # type: ignore
except Exception:  # pragma: no cover - stdlib-only
    fastavro = None


def _validate_avro(parsed) -> None:
    _check_avro(parsed, set())
    if fastavro is not None:
        fastavro.parse_schema(parsed, _write_hint=False, _force=True)


class ApiError(Exception):
    def __init__(self, status: int, error_code: int, message: str):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


class Store:
    """All state, guarded by one lock."""

    def __init__(self, always_schema_type: bool):
        self.lock = threading.Lock()
        self.next_id = 1
        self.by_id: dict[int, dict] = {}  # id -> {"schema", "schemaType", "references", "canon"}
        self.id_by_canon: dict[tuple, int] = {}
        self.subjects: dict[str, list[int]] = {}  # subject -> [id of version 1, id of version 2, ...]
        self.compat = "NONE"
        self.subject_compat: dict[str, str] = {}
        self.always_schema_type = always_schema_type
        self.requests: list[dict] = []
        self.faults: list[dict] = []

    # ---- helpers -------------------------------------------------------------------
    @staticmethod
    def canonical(schema_type: str, text: str, references) -> tuple:
        if schema_type in ("AVRO", "JSON"):
            try:
                parsed = json.loads(text)
            except ValueError as e:
                raise ApiError(422, 42201, f"Invalid schema: not JSON: {e}")
            if schema_type == "AVRO":
                try:
                    _validate_avro(parsed)
                except Exception as e:  # fastavro raises several types
                    raise ApiError(422, 42201, f"Invalid schema: {e}")
            canon = json.dumps(parsed, sort_keys=True, separators=(",", ":"))
        else:
            canon = text.strip()
        refs = json.dumps(references or [], sort_keys=True)
        return (schema_type, canon, refs)

    @staticmethod
    def parse_body(body: dict) -> tuple[str, str, list]:
        if not isinstance(body, dict):
            raise ApiError(422, 42201, "Invalid schema: body must be a JSON object")
        text = body.get("schema")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(422, 42201, "Invalid schema: \"schema\" must be a non-empty string")
        schema_type = body.get("schemaType") or "AVRO"
        if schema_type not in SCHEMA_TYPES:
            raise ApiError(422, 42201, f"Invalid schema: unknown schemaType {schema_type!r}")
        refs = body.get("references") or []
        if not isinstance(refs, list):
            raise ApiError(422, 42201, "Invalid schema: \"references\" must be an array")
        for ref in refs:
            if not (isinstance(ref, dict) and {"name", "subject", "version"} <= ref.keys()):
                raise ApiError(422, 42201, "Invalid schema: bad reference")
        return text, schema_type, refs

    def schema_view(self, sid: int) -> dict:
        entry = self.by_id[sid]
        out = {"schema": entry["schema"]}
        if entry["schemaType"] != "AVRO" or self.always_schema_type:
            out["schemaType"] = entry["schemaType"]
        if entry["references"]:
            out["references"] = entry["references"]
        return out

    def version_view(self, subject: str, version: int) -> dict:
        sid = self.subjects[subject][version - 1]
        out = {"subject": subject, "version": version, "id": sid}
        out.update(self.schema_view(sid))
        return out

    def versions_of(self, subject: str) -> list[int]:
        if subject not in self.subjects:
            raise ApiError(404, 40401, f"Subject '{subject}' not found.")
        return self.subjects[subject]

    def resolve_version(self, subject: str, text: str) -> int:
        ids = self.versions_of(subject)
        if text in ("latest", "-1"):
            return len(ids)
        try:
            version = int(text)
        except ValueError:
            version = 0
        if version <= 0 or version > 2**31 - 1:
            raise ApiError(
                422, 42202,
                f"The specified version '{text}' is not a valid version id. Allowed values are "
                "between [1, 2^31-1] and the string \"latest\"",
            )
        if version > len(ids):
            raise ApiError(404, 40402, f"Version {version} not found.")
        return version

    # ---- operations ----------------------------------------------------------------
    def register(self, subject: str, body: dict) -> dict:
        text, schema_type, refs = self.parse_body(body)
        canon = self.canonical(schema_type, text, refs)
        with self.lock:
            sid = self.id_by_canon.get(canon)
            if sid is None:
                sid = self.next_id
                self.next_id += 1
                self.by_id[sid] = {"schema": text, "schemaType": schema_type, "references": refs}
                self.id_by_canon[canon] = sid
            versions = self.subjects.setdefault(subject, [])
            if sid not in versions:
                versions.append(sid)
            return {"id": sid}

    def lookup(self, subject: str, body: dict) -> dict:
        text, schema_type, refs = self.parse_body(body)
        canon = self.canonical(schema_type, text, refs)
        with self.lock:
            versions = self.versions_of(subject)
            sid = self.id_by_canon.get(canon)
            if sid is None or sid not in versions:
                raise ApiError(404, 40403, "Schema not found")
            return self.version_view(subject, versions.index(sid) + 1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response has Content-Length
    server_version = "leadscore-test-registry/1"
    store: Store = None  # set on the subclass
    auth: bytes | None = None  # expected "Basic ..." header value
    quiet = False

    # ---- plumbing ------------------------------------------------------------------
    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write("registry: %s - %s\n" % (self.address_string(), fmt % args))

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, payload, extra_headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        with self.store.lock:
            self.store.requests.append({"method": self.command, "path": self.path, "status": status})

    def _error(self, status: int, code: int, message: str, extra_headers=None):
        self._send(status, {"error_code": code, "message": message}, extra_headers)

    def _authorized(self) -> bool:
        if self.auth is None:
            return True
        given = (self.headers.get("Authorization") or "").encode()
        return hmac.compare_digest(given, self.auth)

    def _fault(self, path: str):
        """Returns the fault to apply to this request, consuming one use of it."""
        with self.store.lock:
            for fault in self.store.faults:
                if fault.get("method") and fault["method"].upper() != self.command:
                    continue
                if not path.startswith(fault.get("path_prefix") or "/"):
                    continue
                if path.startswith("/__test/"):
                    continue
                if fault["count"] == 0:
                    continue
                if fault["count"] > 0:
                    fault["count"] -= 1
                return dict(fault)
        return None

    def _dispatch(self):
        body_bytes = self._read_body()
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        if not self._authorized():
            self._error(401, 401, "Unauthorized", {"WWW-Authenticate": 'Basic realm="SchemaRegistry"'})
            return
        fault = self._fault(path)
        if fault:
            if fault.get("delay_ms"):
                time.sleep(fault["delay_ms"] / 1000.0)
            if fault.get("status"):
                self._error(fault["status"], fault.get("error_code", fault["status"]),
                            fault.get("message", "injected fault"))
                return
        body = None
        if body_bytes:
            try:
                body = json.loads(body_bytes)
            except ValueError as e:
                self._error(400, 400, f"Unrecognized request body: {e}")
                return
        # path segments, each percent-decoded ("%2F" inside a subject stays one segment)
        segs = [unquote(s) for s in path.split("/")[1:]] if path != "/" else []
        try:
            status, payload = self._route(self.command, segs, body)
        except ApiError as e:
            self._error(e.status, e.error_code, e.message)
            return
        self._send(status, payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = lambda self: self._dispatch()

    # ---- routes --------------------------------------------------------------------
    def _route(self, method: str, s: list[str], body):
        st = self.store
        n = len(s)
        if n == 0 and method in ("GET", "HEAD"):
            return 200, {}
        # test control
        if n == 2 and s[0] == "__test":
            return self._test_route(method, s[1], body)
        # /config, /config/{subject}
        if s and s[0] == "config" and n <= 2:
            if method == "GET":
                if n == 1:
                    return 200, {"compatibilityLevel": st.compat}
                with st.lock:
                    level = st.subject_compat.get(s[1])
                if level is None:
                    raise ApiError(404, 40408, f"Subject '{s[1]}' does not have subject-level compatibility configured")
                return 200, {"compatibilityLevel": level}
            if method == "PUT":
                level = (body or {}).get("compatibility")
                if not isinstance(level, str):
                    raise ApiError(422, 42203, "Invalid compatibility level")
                with st.lock:
                    if n == 1:
                        st.compat = level
                    else:
                        st.subject_compat[s[1]] = level
                return 200, {"compatibility": level}
        if s and s[0] == "schemas":
            if n == 2 and s[1] == "types" and method == "GET":
                return 200, list(SCHEMA_TYPES)
            if n >= 3 and s[1] == "ids" and method in ("GET", "HEAD"):
                try:
                    sid = int(s[2])
                except ValueError:
                    raise ApiError(404, 40403, f"Schema {s[2]} not found")
                with st.lock:
                    if sid not in st.by_id:
                        raise ApiError(404, 40403, f"Schema {sid} not found")
                    if n == 3:
                        return 200, st.schema_view(sid)
                    if n == 4 and s[3] == "schema":
                        return 200, _raw(st.by_id[sid])
                    if n == 4 and s[3] == "subjects":
                        return 200, sorted(k for k, v in st.subjects.items() if sid in v)
                    if n == 4 and s[3] == "versions":
                        return 200, [{"subject": k, "version": v.index(sid) + 1}
                                     for k, v in sorted(st.subjects.items()) if sid in v]
        if s and s[0] == "subjects":
            if n == 1 and method == "GET":
                with st.lock:
                    return 200, sorted(st.subjects)
            if n == 2 and method == "POST":
                return 200, st.lookup(s[1], body)
            if n == 2 and method == "DELETE":
                with st.lock:
                    versions = st.versions_of(s[1])
                    del st.subjects[s[1]]
                    return 200, list(range(1, len(versions) + 1))
            if n == 3 and s[2] == "versions":
                if method == "POST":
                    return 200, st.register(s[1], body)
                if method in ("GET", "HEAD"):
                    with st.lock:
                        return 200, list(range(1, len(st.versions_of(s[1])) + 1))
            if n in (4, 5) and s[2] == "versions" and method in ("GET", "HEAD"):
                with st.lock:
                    version = st.resolve_version(s[1], s[3])
                    if n == 4:
                        return 200, st.version_view(s[1], version)
                    if s[4] == "schema":
                        return 200, _raw(st.by_id[st.subjects[s[1]][version - 1]])
        raise ApiError(404, 404, "HTTP 404 Not Found")

    def _test_route(self, method: str, what: str, body):
        st = self.store
        with st.lock:
            if what == "requests" and method == "GET":
                return 200, list(st.requests)
            if what == "requests" and method == "DELETE":
                st.requests.clear()
                return 200, {}
            if what == "faults" and method == "POST":
                if not isinstance(body, dict):
                    raise ApiError(422, 422, "fault must be a JSON object")
                fault = {
                    "status": int(body.get("status", 503)),
                    "error_code": int(body.get("error_code", body.get("status", 503))),
                    "message": str(body.get("message", "injected fault")),
                    "count": int(body.get("count", 1)),
                    "path_prefix": str(body.get("path_prefix", "/")),
                    "method": body.get("method"),
                    "delay_ms": int(body.get("delay_ms", 0)),
                }
                if body.get("replace"):
                    # One fault for another with no moment between them.
                    st.faults.clear()
                st.faults.append(fault)
                return 200, fault
            if what == "faults" and method == "DELETE":
                st.faults.clear()
                return 200, {}
        raise ApiError(404, 404, "HTTP 404 Not Found")


def _raw(entry: dict):
    """The schema itself (as JSON when it is JSON, else the text)."""
    try:
        return json.loads(entry["schema"])
    except ValueError:
        return entry["schema"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port (default)")
    ap.add_argument("--user", help="require HTTP basic auth with this user")
    ap.add_argument("--password", help="password for --user")
    ap.add_argument("--register", action="append", default=[], metavar="SUBJECT=FILE",
                    help="pre-register FILE's schema (AVRO) under SUBJECT before LISTENING")
    ap.add_argument("--always-schema-type", action="store_true",
                    help='include "schemaType": "AVRO" in responses (default: omit, like Confluent)')
    ap.add_argument("--exit-on-stdin-eof", action="store_true",
                    help="stop when stdin closes (so the server dies with its parent test)")
    ap.add_argument("--quiet", action="store_true", help="no per-request log on stderr")
    args = ap.parse_args(argv)
    if (args.user is None) != (args.password is None):
        ap.error("--user and --password go together")

    store = Store(args.always_schema_type)
    for item in args.register:
        subject, sep, path = item.partition("=")
        if not sep or not subject or not path:
            ap.error(f"--register wants SUBJECT=FILE, got {item!r}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            store.register(subject, {"schema": text})
        except (OSError, ApiError) as e:
            ap.error(f"--register {item}: {e}")

    handler = type("BoundHandler", (Handler,), {
        "store": store,
        "quiet": args.quiet,
        "auth": None if args.user is None else b"Basic " + base64.b64encode(
            f"{args.user}:{args.password}".encode()),
    })
    try:
        server = ThreadingHTTPServer((args.host, args.port), handler)
    except OSError as e:
        print(f"registry: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    server.daemon_threads = True
    print(f"LISTENING {server.server_address[1]}", flush=True)

    stop = threading.Event()

    def _stop(*_):
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.exit_on_stdin_eof:
        def _watch_stdin():
            try:
                while os.read(sys.stdin.fileno(), 4096):
                    pass
            except OSError:
                pass
            stop.set()
        threading.Thread(target=_watch_stdin, daemon=True).start()

    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    while not stop.wait(0.2):
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
