#!/usr/bin/env python3
"""Consul HTTP API emulator for the ngx-stream-upsync test suite.

Standard library only (Python >= 3.11).  It stands in for ``consul agent -dev``
on machines where no Consul binary exists, so it copies the behaviour a client
can observe: status codes, bodies, headers and blocking-query timing.

Usage::

    python3 consul_emulator.py --listen 127.0.0.1:0 [--acl-token TOKEN[=PREFIX]]...
        [--acl-default deny|allow] [--jitter on|off] [--max-body BYTES]
        [--max-conns-per-client N] [--control-listen 127.0.0.1:PORT] [--verbose]

Once it is ready it prints ``consul-emulator listening on 127.0.0.1:PORT`` (and,
with --control-listen, a second line ``consul-emulator control on
127.0.0.1:PORT``).  SIGTERM or SIGINT makes it exit with status 0.

What is emulated
----------------
* One node ``emu-node`` (127.0.0.1, datacenter dc1) that is also the leader.
  It has a ``serfHealth`` check that is always passing, and the built-in
  ``consul`` service, as a dev agent has.
* KV: ``GET/PUT/DELETE /v1/kv/<key>`` with ``recurse``, ``keys``,
  ``separator``, ``raw``, ``cas`` and ``flags``.  Prefixes are plain string
  prefixes.  An empty value is returned as ``null``.
* Index rules copied from Consul's state store.  There is one global Raft-like
  index.  It starts at 1 (node bootstrap) and every write adds 1.  A single-key
  read returns the key's ModifyIndex, or the KV table index when the key is
  missing.  A prefix read returns the highest ModifyIndex or tombstone (delete)
  index under the prefix, or the KV table index when nothing ever existed
  there.  The empty prefix always uses the KV table index.
* Blocking queries (``?index=&wait=``) on every GET read endpoint.  The wait is
  a Go duration, 5m by default and at most 10m, plus up to wait/16 jitter when
  ``--jitter on``.  A blocked query wakes within milliseconds of a write that
  moves its index.
* Catalog, health and agent: ``/v1/agent/service/register``,
  ``/v1/agent/service/deregister/<id>``, ``/v1/agent/check/{pass,warn,fail}/<id>``,
  ``/v1/agent/check/update/<id>``, ``/v1/agent/services``,
  ``/v1/agent/checks``, ``/v1/agent/self``, ``/v1/catalog/service/<name>``
  (``tag``), ``/v1/catalog/services``, ``/v1/health/service/<name>``
  (``passing``, ``tag``) and ``/v1/status/leader``.  A catalog or health query
  for a service uses that service's own index.  Any register, deregister or
  check change of the service moves it.
* ACLs, turned on by ``--acl-token`` or ``--acl-default``.  The token comes
  from ``?token=``, ``X-Consul-Token`` or ``Authorization: Bearer``, in that
  order.  A token that is sent but unknown gets 403 ``ACL not found``.  With no
  token the request runs as the anonymous token, which gets the default
  policy.  ``--acl-token T`` may do everything.  ``--acl-token T=PREFIX`` may
  read and write keys under PREFIX (other keys fall back to the default
  policy), and may do everything that is not KV.  A single-key KV read or
  write without permission gets 403 with a body starting ``Permission
  denied``.  List reads are filtered and carry
  ``X-Consul-Results-Filtered-By-Acls: true`` when something was dropped; a
  list filtered down to nothing gets 404, as Consul answers.
* Headers use Go's canonical spelling, as Consul sends them:
  ``X-Consul-Index``, ``X-Consul-Knownleader: true``,
  ``X-Consul-Lastcontact: 0``, ``X-Consul-Default-Acl-Policy``.  This
  emulator adds X-Consul-Index to every /v1 answer except errors (real Consul
  adds it to reads only).  JSON answers are ``application/json``.  Errors and
  empty 404s are ``text/plain; charset=utf-8``, as Go answers.
* Blocking queries do not end when their client goes away: Consul runs them
  until the index moves, the wait (plus jitter) is over, a snapshot is
  restored or the server stops, whatever became of the connection (its
  blocking query code waits on the server's own context, never the HTTP
  request's).  Only then is the answer written, the write fails, and the
  connection is closed.
* The per-client connection limit, ``limits.http_max_conns_per_client``
  (``--max-conns-per-client N``, 200 by default as in Consul since 1.7.1, 0
  for none), enforced as Consul's go-connlimit does in http.Server.ConnState:
  every connection on the main listener counts against its client IP from
  accept until it is closed, idle keep-alive ones and ones whose blocking
  query lost its client included (see above: such a slot comes back only
  when the query ends).  A connection accepted while its IP already holds N
  is not counted: at once, before its request is read, it gets ``HTTP/1.1
  429 Too Many Requests`` (``Content-Type: text/plain``, ``Connection:
  close``, body ``Your IP is issuing too many concurrent connections, please
  rate limit your calls`` and a newline; Consul gives the write 10 ms), and
  is closed without reading: if the client's request had arrived, the close
  is a reset, which may reach the client before it reads the 429.  (Consul
  releases from before mid-2020 closed such connections without the 429.)
  A connection whose first request is a ``/_emu/`` request gives its slot
  back then; the ``--control-listen`` listener is not limited.
* Transactions: ``PUT /v1/txn`` with KV operations (verbs ``set``,
  ``delete`` and ``delete-tree``), applied at once under one index; at most 64
  operations per transaction, as Consul allows by default.

What is not emulated
--------------------
Sessions and locks (``acquire``/``release`` give 400), transaction verbs
other than the three KV ones above, prepared
queries, ``?filter=`` expressions (400), ``?near``, multiple datacenters (any
``dc`` other than dc1 gives 500), ``hash``-based blocking, and check execution.
HTTP, TCP and other checks never run.  They stay in their initial status
(``critical`` unless the definition gives ``Status``) until
``/v1/agent/check/{pass,warn,fail,update}`` changes them; the emulator accepts
those calls for any check, not only TTL checks.  Bodies larger than
``--max-body`` (default 524288, Consul's ``kv_max_value_size``) are refused
with 413 on every endpoint, and the connection is closed.

Test control API (not part of Consul, never ACL-protected)
----------------------------------------------------------
Bodies are JSON.  POST and PUT are both accepted.

``GET /_emu/stats``
    ``{"requests_total", "requests": {"GET /v1/kv/x": n}, "open_connections",
    "connections_total", "blocking_in_flight", "blocking_by_path": {path: n},
    "index", "control_requests_total", "faults_active",
    "max_conns_per_client", "conns_by_client": {ip: n},
    "refused_over_limit"}``.  ``conns_by_client`` counts the connections
    holding a slot of the per-client limit; ``refused_over_limit`` the
    connections turned away with a 429.
    ``/_emu/`` requests are counted only in ``control_requests_total``.  A
    connection counts in ``open_connections`` from accept until close, unless
    its first request is a ``/_emu/`` request.  ``connections_total`` counts
    connections that carried at least one non-control request.
``POST /_emu/reset_stats``
    Zeroes the counters (not the gauges open_connections / blocking_* /
    conns_by_client).
``POST /_emu/fault``  ``{"mode", "path_prefix": "", "method": null, "count": -1, ...}``
    Adds a fault and answers ``{"id": n}``.  A fault matches non-control
    requests whose decoded path starts with path_prefix (and whose method
    matches, if one is given).  The oldest matching fault wins.  ``count``
    requests are affected, then the fault expires; -1 means until cleared.
    Modes:

    ``delay`` (``delay_ms``)
        Sleep, then answer normally.  Blocking still applies.
    ``status`` (``status``, default 500; ``body``)
        Answer that status at once.
    ``malformed``
        200 with the invalid JSON ``[{"Key": "x", `` and a correct
        Content-Length.
    ``truncate``
        The real body (computed without blocking) is announced in full in
        Content-Length, but only half of it is sent, then the connection is
        closed.
    ``body`` (``body`` string, ``status`` default 200, ``headers`` dict)
        Answer exactly that body at once.  The headers override the standard
        ones; a value of null removes a header.
    ``index_backwards`` (``index``, default 1)
        Answer the current data at once (no blocking), but with
        X-Consul-Index forced to that value.  Consul does this after a
        snapshot restore.
    ``hang``
        Read the request and never answer.  The socket stays open until the
        fault is cleared (clear_faults, even if its count has run out) or the
        server stops, then it is closed.
    ``close``
        Read the request, then close the connection without answering (FIN).
    ``refuse``
        The registry is down.  See the design note below.
``POST /_emu/clear_faults``  (optional ``{"id": n}``)
    Removes all faults, or one.  This releases hung requests.
``GET /_emu/faults``
    Lists the active faults.
``POST /_emu/set_index``  ``{"index": n}``
    Forces the global index down (or up) to n, as a snapshot restore would.
    Every stored index is clamped to at most n, and parked blocking queries
    are released at once with the current data, as Consul releases watches
    on a restore.  The next write gets n+1.

Design note on ``refuse``: the control API listens on the same port as the
Consul API, so the listening socket cannot simply be closed.  While a refuse
fault is active, every matching non-control request is answered by resetting
the connection (RST) right after the request is read.  Open keep-alive Consul
connections are shut down, and parked blocking queries are reset.  When the
emulator is started with ``--control-listen``, a second listener serves the
control API (and the Consul API too, with no faults and no stats, so a test
can prepare data while the registry is "down").  A refuse fault with an empty
path_prefix then really closes the main listening socket, so clients get
ECONNREFUSED.  It is bound again on the same port when the fault is cleared.
The control request returns only once the listener has changed state.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

NODE_NAME = "emu-node"
NODE_ADDR = "127.0.0.1"
NODE_ID = "5a1c7e00-0000-4000-8000-00000000e0de"
DATACENTER = "dc1"
VERSION = "1.21.0-emulator"
LEADER = "127.0.0.1:8300"

DEFAULT_WAIT = 300.0          # seconds (5m)
MAX_WAIT = 600.0              # seconds (10m)
JITTER_FRACTION = 16
POLL_INTERVAL = 0.05          # how often parked requests check their socket
DEFAULT_MAX_BODY = 512 * 1024
# Consul's limits.http_max_conns_per_client (200 since 1.7.1; 0 turns the limit off).
DEFAULT_MAX_CONNS_PER_CLIENT = 200
# What go-connlimit writes to a connection over the limit (Consul sets a 10 ms
# deadline for it, then closes the connection without reading the request).
TOO_MANY_CONNS_MSG = b"Your IP is issuing too many concurrent connections, please rate limit your calls\n"
TOO_MANY_CONNS = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(TOO_MANY_CONNS_MSG)
                  + TOO_MANY_CONNS_MSG)
CONTROL_MAX_BODY = 1024 * 1024

JSON_CT = "application/json"
TEXT_CT = "text/plain; charset=utf-8"
MALFORMED_BODY = b'[{"Key": "x", '
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"

FAULT_MODES = ("delay", "status", "malformed", "truncate", "body",
               "index_backwards", "hang", "close", "refuse")
# Faults that replace the answer and therefore never block.
IMMEDIATE_FAULTS = ("status", "malformed", "truncate", "body", "index_backwards")
CHECK_STATUSES = ("passing", "warning", "critical")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6,
                   "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Parse a Go ``time.ParseDuration`` string ("1m30s", "100ms") to seconds."""
    s, sign = text.strip(), 1.0
    if s and s[0] in "+-":
        sign, s = (-1.0 if s[0] == "-" else 1.0), s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_go_bool(text: str) -> bool:
    """Go strconv.ParseBool; the empty string (bare ``?passing``) is true."""
    if text == "":
        return True
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(text)


def json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def ci_get(obj: dict, name: str, default=None):
    """Case-insensitive key lookup, like Go's encoding/json field matching."""
    if name in obj:
        return obj[name]
    lname = name.lower()
    for key, value in obj.items():
        if key.lower() == lname:
            return value
    return default


def parse_uint(text: str | None, what: str) -> int:
    try:
        value = int(text or "")
    except ValueError:
        raise HttpError(400, f"Invalid {what}: {text!r}") from None
    if value < 0:
        raise HttpError(400, f"Invalid {what}: {text!r}")
    return value


def clamp(value: int, limit: int) -> int:
    return min(value, limit)


class HttpError(Exception):
    """An error answered as ``status`` with a text/plain body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ResetConnection(Exception):
    """A refuse fault: drop the connection with an RST."""


# --------------------------------------------------------------------------
# Request / response value objects
# --------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str                       # percent-decoded path
    query: dict[str, list[str]]
    headers: object                 # email.message.Message
    body: bytes = b""

    def has(self, name: str) -> bool:
        return name in self.query

    def q(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def token(self) -> str:
        tok = self.q("token") or self.headers.get("X-Consul-Token") or ""
        if not tok:
            auth = self.headers.get("Authorization") or ""
            if auth[:7].lower() == "bearer ":
                tok = auth[7:].strip()
        return tok


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    index: int | None = None        # X-Consul-Index (None: not a Consul answer)
    content_type: str | None = JSON_CT
    headers: dict = field(default_factory=dict)   # overrides; None removes
    truncate: bool = False
    close: bool = False


def json_response(obj, index: int | None, status: int = 200, headers=None) -> Response:
    return Response(status, json_bytes(obj), index, JSON_CT, dict(headers or {}))


def empty_404(index: int, headers=None) -> Response:
    return Response(404, b"", index, TEXT_CT, dict(headers or {}))


def error_response(err: HttpError) -> Response:
    return Response(err.status, err.message.encode(), None, TEXT_CT)


# --------------------------------------------------------------------------
# ACL configuration (immutable)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    secret: str
    prefixes: tuple[str, ...] | None   # None: unrestricted
    anonymous: bool = False

    @property
    def accessor(self) -> str:
        if self.anonymous:
            return ANONYMOUS_ACCESSOR
        return str(uuid.uuid5(uuid.NAMESPACE_OID, "emu-token:" + self.secret))


ALL_ACCESS = Principal("", None)
ANONYMOUS = Principal("", (), anonymous=True)


@dataclass(frozen=True)
class Acl:
    enabled: bool
    default_allow: bool
    tokens: dict

    @classmethod
    def from_args(cls, specs: list[str], default: str | None) -> "Acl":
        prefixes: dict[str, list[str] | None] = {}
        for spec in specs:
            secret, sep, prefix = spec.partition("=")
            if not secret:
                raise ValueError(f"bad --acl-token {spec!r}")
            if not sep or prefixes.get(secret, []) is None:
                prefixes[secret] = None
            else:
                prefixes.setdefault(secret, []).append(prefix)
        tokens = {s: Principal(s, None if p is None else tuple(p)) for s, p in prefixes.items()}
        enabled = bool(tokens) or default is not None
        return cls(enabled, default == "allow", tokens)

    @property
    def policy_name(self) -> str:
        return "allow" if (self.default_allow or not self.enabled) else "deny"

    def resolve(self, secret: str) -> Principal:
        if not self.enabled:
            return ALL_ACCESS
        if not secret:
            return ANONYMOUS
        principal = self.tokens.get(secret)
        if principal is None:
            raise HttpError(403, "ACL not found")
        return principal

    def allows(self, who: Principal, kind: str, name: str) -> bool:
        """kind: 'key', 'service', 'node', 'agent' (read and write alike)."""
        if not self.enabled or who.prefixes is None:
            return True
        if who.anonymous:
            return self.default_allow
        if kind != "key":
            return True
        if any(name.startswith(p) for p in who.prefixes):
            return True
        return self.default_allow

    def require(self, who: Principal, kind: str, name: str, op: str) -> None:
        if self.allows(who, kind, name):
            return
        if who.anonymous:
            raise HttpError(403, f"Permission denied: anonymous token lacks permission "
                                 f"'{kind}:{op}' on \"{name}\". The anonymous token is used "
                                 f"implicitly when a request does not specify a token.")
        raise HttpError(403, f"Permission denied: token with AccessorID '{who.accessor}' "
                             f"lacks permission '{kind}:{op}' on \"{name}\"")


@dataclass(frozen=True)
class Config:
    acl: Acl
    jitter: bool
    max_body: int
    verbose: bool
    max_conns_per_client: int = DEFAULT_MAX_CONNS_PER_CLIENT


# --------------------------------------------------------------------------
# Stored objects
# --------------------------------------------------------------------------

@dataclass
class KVEntry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int

    def to_json(self) -> dict:
        value = base64.b64encode(self.value).decode() if self.value else None
        return {"LockIndex": 0, "Key": self.key, "Flags": self.flags, "Value": value,
                "CreateIndex": self.create_index, "ModifyIndex": self.modify_index}


@dataclass
class Service:
    id: str
    name: str
    address: str = ""
    port: int = 0
    tags: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    weights: dict = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    builtin: bool = False
    create_index: int = 0
    modify_index: int = 0

    def same_as(self, other: "Service") -> bool:
        fields = ("id", "name", "address", "port", "tags", "meta", "weights",
                  "enable_tag_override")
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    def has_tags(self, wanted: list[str]) -> bool:
        have = {t.casefold() for t in self.tags}
        return all(t.casefold() in have for t in wanted)


@dataclass
class Check:
    id: str
    name: str
    status: str
    service_id: str
    service_name: str
    type: str = "ttl"
    notes: str = ""
    output: str = ""
    interval: str = ""
    timeout: str = ""
    create_index: int = 0
    modify_index: int = 0

    def same_as(self, other: "Check") -> bool:
        fields = ("id", "name", "status", "service_id", "service_name", "type",
                  "notes", "output", "interval", "timeout")
        return all(getattr(self, f) == getattr(other, f) for f in fields)


@dataclass
class Fault:
    id: int
    mode: str
    path_prefix: str = ""
    method: str | None = None
    remaining: int = -1
    params: dict = field(default_factory=dict)
    hits: int = 0
    cleared: bool = False

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method:
            return False
        return path.startswith(self.path_prefix)

    def to_json(self) -> dict:
        return {"id": self.id, "mode": self.mode, "path_prefix": self.path_prefix,
                "method": self.method, "remaining": self.remaining, "hits": self.hits,
                **self.params}


@dataclass(eq=False)
class ConnInfo:
    sock: socket.socket
    backdoor: bool                  # accepted on the --control-listen socket
    kind: str = "pending"           # pending | api | control | backdoor
    last_path: str = ""


@dataclass
class Stats:
    requests_total: int = 0
    requests: Counter = field(default_factory=Counter)
    control_requests_total: int = 0
    connections_total: int = 0
    blocking: Counter = field(default_factory=Counter)
    refused_over_limit: int = 0


def new_builtin_consul_service() -> Service:
    return Service(id="consul", name="consul", port=8300, builtin=True,
                   create_index=1, modify_index=1)


# --------------------------------------------------------------------------
# State: the one place holding mutable data, guarded by one condition
# --------------------------------------------------------------------------

class State:
    """All mutable emulator state.  Every method takes ``self.cond``."""

    def __init__(self):
        self.cond = threading.Condition(threading.RLock())
        self.index = 1              # global Raft-like index
        self.seq = 0                # bumped on every observable change
        self.abandon_gen = 0        # bumped by set_index (snapshot restore)
        self.stopping = False
        self.max_conns_per_client = DEFAULT_MAX_CONNS_PER_CLIENT
        self.kv: dict[str, KVEntry] = {}
        self.tombstones: dict[str, int] = {}
        self.kv_index = 1
        builtin = new_builtin_consul_service()
        self.services: dict[str, Service] = {builtin.id: builtin}
        self.checks: dict[str, Check] = {}
        self.service_index: dict[str, int] = {builtin.name: 1}
        self.catalog_index = 1
        self.faults: list[Fault] = []
        self.retired_faults: list[Fault] = []   # count used up, may still hold hung requests
        self.next_fault_id = 1
        self.listener_up = True
        self.conns: set[ConnInfo] = set()
        # connections counted against the per-client limit, by client IP
        self.limited: dict[socket.socket, str] = {}
        self.per_client: Counter = Counter()
        self.stats = Stats()

    # -- generic ----------------------------------------------------------

    def _next_index(self) -> int:
        self.index += 1
        return self.index

    def _changed(self) -> None:
        self.seq += 1
        self.cond.notify_all()

    def current_index(self) -> int:
        with self.cond:
            return self.index

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def sleep(self, seconds: float) -> None:
        """Sleep that ends early when the server stops."""
        with self.cond:
            self.cond.wait_for(lambda: self.stopping, timeout=max(0.0, seconds))

    # -- KV ----------------------------------------------------------------

    def kv_get(self, key: str) -> tuple[int, KVEntry | None]:
        with self.cond:
            entry = self.kv.get(key)
            if entry is not None:
                return entry.modify_index, entry
            return max(1, self.kv_index), None

    def kv_list(self, prefix: str) -> tuple[int, list[KVEntry]]:
        with self.cond:
            entries = sorted((e for k, e in self.kv.items() if k.startswith(prefix)),
                             key=lambda e: e.key)
            if prefix == "":
                return max(1, self.kv_index), entries
            idx = max([e.modify_index for e in entries]
                      + [i for k, i in self.tombstones.items() if k.startswith(prefix)],
                      default=0)
            return (idx or max(1, self.kv_index)), entries

    def kv_put(self, key: str, value: bytes, flags: int, cas: int | None) -> bool:
        with self.cond:
            old = self.kv.get(key)
            if cas is not None:
                if cas == 0 and old is not None:
                    return False
                if cas != 0 and (old is None or old.modify_index != cas):
                    return False
            idx = self._next_index()
            created = old.create_index if old else idx
            self.kv[key] = KVEntry(key, bytes(value), flags, created, idx)
            self.kv_index = idx
            self._changed()
            return True

    def kv_delete(self, key: str, cas: int | None) -> bool:
        with self.cond:
            old = self.kv.get(key)
            if cas is not None and (old is None or old.modify_index != cas):
                return old is None
            idx = self._next_index()
            if old is not None:
                del self.kv[key]
                self.tombstones[key] = idx
                self.kv_index = idx
            self._changed()
            return True

    def kv_txn(self, ops: list[tuple[str, str, bytes, int]]) -> int:
        """Applies (verb, key, value, flags) KV operations at once, under one index."""
        with self.cond:
            idx = self._next_index()
            for verb, key, value, flags in ops:
                if verb == "set":
                    old = self.kv.get(key)
                    created = old.create_index if old else idx
                    self.kv[key] = KVEntry(key, bytes(value), flags, created, idx)
                elif verb == "delete":
                    if self.kv.pop(key, None) is not None:
                        self.tombstones[key] = idx
                else:  # delete-tree
                    for k in [k for k in self.kv if k.startswith(key)]:
                        del self.kv[k]
                        self.tombstones[k] = idx
            self.kv_index = idx
            self._changed()
            return idx

    def kv_delete_tree(self, prefix: str) -> None:
        with self.cond:
            idx = self._next_index()
            doomed = [k for k in self.kv if k.startswith(prefix)]
            for key in doomed:
                del self.kv[key]
                self.tombstones[key] = idx
            if doomed:
                self.kv_index = idx
            self._changed()

    # -- catalog -------------------------------------------------------------

    def _touch_service(self, name: str, idx: int) -> None:
        self.service_index[name] = idx
        self.catalog_index = idx

    def service_query_index(self, name: str) -> int:
        with self.cond:
            if any(s.name == name for s in self.services.values()):
                return max(1, self.service_index.get(name, 1))
            return max(1, self.catalog_index)

    def catalog_snapshot(self) -> tuple[list[Service], dict[str, Check]]:
        with self.cond:
            services = sorted(self.services.values(), key=lambda s: s.id)
            return services, dict(self.checks)

    def register_service(self, svc: Service, checks: list[Check], explicit_status: set[str]) -> None:
        """Add or replace an agent service and its checks (no-op when identical)."""
        with self.cond:
            old = self.services.get(svc.id)
            old_checks = {c.id: c for c in self.checks.values() if c.service_id == svc.id}
            for chk in checks:                  # keep status across re-registration
                prev = old_checks.get(chk.id)
                if prev is not None and chk.id not in explicit_status:
                    chk.status, chk.output = prev.status, prev.output
            same = (old is not None and old.same_as(svc) and len(old_checks) == len(checks)
                    and all(c.id in old_checks and old_checks[c.id].same_as(c) for c in checks))
            if same:
                return
            idx = self._next_index()
            svc.create_index = old.create_index if old else idx
            svc.modify_index = idx
            self.services[svc.id] = svc
            for cid in old_checks:
                del self.checks[cid]
            for chk in checks:
                prev = old_checks.get(chk.id)
                chk.create_index = prev.create_index if prev else idx
                chk.modify_index = prev.modify_index if prev and prev.same_as(chk) else idx
                self.checks[chk.id] = chk
            if old is not None and old.name != svc.name:
                self._touch_service(old.name, idx)
            self._touch_service(svc.name, idx)
            self._changed()

    def deregister_service(self, service_id: str) -> bool:
        with self.cond:
            svc = self.services.get(service_id)
            if svc is None or svc.builtin:
                return False
            idx = self._next_index()
            del self.services[service_id]
            for cid in [c.id for c in self.checks.values() if c.service_id == service_id]:
                del self.checks[cid]
            self._touch_service(svc.name, idx)
            self._changed()
            return True

    def update_check(self, check_id: str, status: str, output: str) -> bool:
        with self.cond:
            chk = self.checks.get(check_id)
            if chk is None:
                return False
            if chk.status == status and chk.output == output:
                return True
            idx = self._next_index()
            chk.status, chk.output, chk.modify_index = status, output, idx
            self._touch_service(chk.service_name, idx)
            self._changed()
            return True

    def find_check(self, check_id: str) -> Check | None:
        with self.cond:
            return self.checks.get(check_id)

    # -- index manipulation -------------------------------------------------

    def set_index(self, value: int) -> None:
        with self.cond:
            self.index = value
            self.kv_index = clamp(self.kv_index, value)
            self.catalog_index = clamp(self.catalog_index, value)
            for entry in self.kv.values():
                entry.create_index = clamp(entry.create_index, value)
                entry.modify_index = clamp(entry.modify_index, value)
            for key in self.tombstones:
                self.tombstones[key] = clamp(self.tombstones[key], value)
            for obj in list(self.services.values()) + list(self.checks.values()):
                obj.create_index = clamp(obj.create_index, value)
                obj.modify_index = clamp(obj.modify_index, value)
            for name in self.service_index:
                self.service_index[name] = clamp(self.service_index[name], value)
            self.abandon_gen += 1
            self._changed()

    # -- blocking ------------------------------------------------------------

    def run_query(self, reader, min_index: int, timeout: float, path: str,
                  refused) -> Response:
        """Run ``reader`` (called with the lock held) as a blocking query.

        Returns as soon as the reader's index exceeds ``min_index``, when the
        timeout elapses, or on a snapshot restore.  Raises ResetConnection when
        a refuse fault appears.  A client that hangs up does not end the query
        (Consul's blocking queries never look at their client): the query, its
        connection and its slot of the per-client limit last until it ends.
        """
        deadline = time.monotonic() + timeout
        with self.cond:
            resp = reader()
            if min_index == 0 or resp.index > min_index:
                return resp
            gen, seen = self.abandon_gen, self.seq
            self.stats.blocking[path] += 1
            try:
                while not self.stopping and gen == self.abandon_gen:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self.cond.wait(min(remaining, POLL_INTERVAL))
                    if refused():
                        raise ResetConnection()
                    if self.seq != seen:
                        seen = self.seq
                        resp = reader()
                        if resp.index > min_index:
                            return resp
            finally:
                self.stats.blocking[path] -= 1
                if self.stats.blocking[path] <= 0:
                    del self.stats.blocking[path]
            return reader()

    # -- faults ----------------------------------------------------------------

    def add_fault(self, fault_spec: dict, current: ConnInfo | None) -> Fault:
        with self.cond:
            fault = Fault(self.next_fault_id, **fault_spec)
            self.next_fault_id += 1
            self.faults.append(fault)
            if fault.mode == "refuse":
                self._shutdown_api_connections(fault, current)
            self._changed()
            return fault

    def _shutdown_api_connections(self, fault: Fault, current: ConnInfo | None) -> None:
        for conn in list(self.conns):
            if conn is current or conn.kind != "api":
                continue
            if conn.last_path.startswith(fault.path_prefix):
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def clear_faults(self, fault_id: int | None = None) -> int:
        with self.cond:
            dropped = 0
            for fault in self.faults + self.retired_faults:
                if fault_id is None or fault.id == fault_id:
                    fault.cleared = True
                    dropped += fault in self.faults
            self.faults = [f for f in self.faults if not f.cleared]
            self.retired_faults = [f for f in self.retired_faults if not f.cleared]
            self._changed()
            return dropped

    def list_faults(self) -> list[dict]:
        with self.cond:
            return [f.to_json() for f in self.faults]

    def take_fault(self, method: str, path: str) -> Fault | None:
        """Return the first fault matching this request and use up one hit."""
        with self.cond:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    if fault.remaining > 0:
                        fault.remaining -= 1
                        if fault.remaining == 0:
                            self.faults.remove(fault)
                            self.retired_faults.append(fault)
                            self._changed()
                    return fault
            return None

    def refusing(self, method: str, path: str) -> bool:
        with self.cond:
            return any(f.mode == "refuse" and f.matches(method, path) for f in self.faults)

    def listener_should_be_down(self) -> bool:
        with self.cond:
            return any(f.mode == "refuse" and f.path_prefix == "" and not f.method
                       for f in self.faults)

    def wait_hang(self, fault: Fault, alive) -> None:
        """Park a hung request until its fault is cleared or the server stops."""
        with self.cond:
            while not (fault.cleared or self.stopping):
                self.cond.wait(POLL_INTERVAL)
                if not alive():
                    return

    def set_listener_up(self, up: bool) -> None:
        with self.cond:
            self.listener_up = up
            self.cond.notify_all()

    def wait_listener(self, up: bool, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.listener_up == up or self.stopping,
                                      timeout=timeout)

    # -- connections and statistics --------------------------------------------

    def admit(self, sock: socket.socket, ip: str, limit: int) -> bool:
        """go-connlimit's Accept: count the connection against its client IP,
        or refuse it when that IP already has ``limit`` open (0: no limit)."""
        with self.cond:
            if limit > 0 and self.per_client[ip] >= limit:
                self.stats.refused_over_limit += 1
                return False
            self.per_client[ip] += 1
            self.limited[sock] = ip
            return True

    def release(self, sock: socket.socket) -> None:
        """The connection is closed (or turned out to be a control connection):
        its slot is free again."""
        with self.cond:
            ip = self.limited.pop(sock, None)
            if ip is not None:
                self.per_client[ip] -= 1
                if self.per_client[ip] <= 0:
                    del self.per_client[ip]

    def conn_open(self, sock: socket.socket, backdoor: bool) -> ConnInfo:
        with self.cond:
            conn = ConnInfo(sock, backdoor, "backdoor" if backdoor else "pending")
            self.conns.add(conn)
            return conn

    def conn_close(self, conn: ConnInfo) -> None:
        with self.cond:
            self.conns.discard(conn)

    def note_request(self, conn: ConnInfo, method: str, path: str, control: bool) -> None:
        with self.cond:
            if conn.backdoor:
                return
            if control:
                self.stats.control_requests_total += 1
                if conn.kind == "pending":
                    conn.kind = "control"
                    self.release(conn.sock)     # not part of Consul: no slot held
                return
            self.stats.requests_total += 1
            self.stats.requests[f"{method} {path}"] += 1
            conn.last_path = path
            if conn.kind != "api":
                conn.kind = "api"
                self.stats.connections_total += 1

    def reset_stats(self) -> None:
        with self.cond:
            blocking = self.stats.blocking
            self.stats = Stats(blocking=blocking)

    def stats_json(self) -> dict:
        with self.cond:
            return {
                "requests_total": self.stats.requests_total,
                "requests": dict(self.stats.requests),
                "open_connections": sum(1 for c in self.conns if c.kind in ("pending", "api")),
                "connections_total": self.stats.connections_total,
                "blocking_in_flight": sum(self.stats.blocking.values()),
                "blocking_by_path": dict(self.stats.blocking),
                "index": self.index,
                "control_requests_total": self.stats.control_requests_total,
                "faults_active": len(self.faults),
                "max_conns_per_client": self.max_conns_per_client,
                "conns_by_client": dict(self.per_client),
                "refused_over_limit": self.stats.refused_over_limit,
            }


# --------------------------------------------------------------------------
# JSON shapes
# --------------------------------------------------------------------------

def node_json() -> dict:
    return {"ID": NODE_ID, "Node": NODE_NAME, "Address": NODE_ADDR, "Datacenter": DATACENTER,
            "TaggedAddresses": {"lan": NODE_ADDR, "lan_ipv4": NODE_ADDR,
                                "wan": NODE_ADDR, "wan_ipv4": NODE_ADDR},
            "Meta": {"consul-network-segment": ""}, "CreateIndex": 1, "ModifyIndex": 1}


def serf_health_json() -> dict:
    return {"Node": NODE_NAME, "CheckID": "serfHealth", "Name": "Serf Health Status",
            "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
            "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
            "Interval": "", "Timeout": "", "CreateIndex": 1, "ModifyIndex": 1}


def check_json(chk: Check, tags: list) -> dict:
    return {"Node": NODE_NAME, "CheckID": chk.id, "Name": chk.name, "Status": chk.status,
            "Notes": chk.notes, "Output": chk.output, "ServiceID": chk.service_id,
            "ServiceName": chk.service_name, "ServiceTags": list(tags), "Type": chk.type,
            "Interval": chk.interval, "Timeout": chk.timeout,
            "CreateIndex": chk.create_index, "ModifyIndex": chk.modify_index}


def catalog_entry_json(svc: Service) -> dict:
    node = node_json()
    return {"ID": NODE_ID, "Node": NODE_NAME, "Address": NODE_ADDR, "Datacenter": DATACENTER,
            "TaggedAddresses": node["TaggedAddresses"], "NodeMeta": node["Meta"],
            "ServiceKind": "", "ServiceID": svc.id, "ServiceName": svc.name,
            "ServiceTags": list(svc.tags), "ServiceAddress": svc.address,
            "ServiceWeights": dict(svc.weights), "ServiceMeta": dict(svc.meta),
            "ServicePort": svc.port, "ServiceEnableTagOverride": svc.enable_tag_override,
            "CreateIndex": svc.create_index, "ModifyIndex": svc.modify_index}


def agent_service_json(svc: Service) -> dict:
    return {"ID": svc.id, "Service": svc.name, "Tags": list(svc.tags), "Meta": dict(svc.meta),
            "Port": svc.port, "Address": svc.address, "Weights": dict(svc.weights),
            "EnableTagOverride": svc.enable_tag_override, "Datacenter": DATACENTER}


def health_service_json(svc: Service) -> dict:
    return {"ID": svc.id, "Service": svc.name, "Tags": list(svc.tags), "Address": svc.address,
            "Meta": dict(svc.meta), "Port": svc.port, "Weights": dict(svc.weights),
            "EnableTagOverride": svc.enable_tag_override,
            "CreateIndex": svc.create_index, "ModifyIndex": svc.modify_index}


def health_checks_json(svc: Service, checks: dict[str, Check]) -> list[dict]:
    own = sorted((c for c in checks.values() if c.service_id == svc.id), key=lambda c: c.id)
    return [serf_health_json()] + [check_json(c, svc.tags) for c in own]


# --------------------------------------------------------------------------
# Agent service definition parsing
# --------------------------------------------------------------------------

def parse_service_definition(body: bytes) -> tuple[Service, list[Check], set[str]]:
    try:
        spec = json.loads(body or b"null")
    except ValueError as exc:
        raise HttpError(400, f"Request decode failed: {exc}") from None
    if not isinstance(spec, dict):
        raise HttpError(400, "Request decode failed: expected a JSON object")
    name = ci_get(spec, "Name") or ci_get(spec, "Service") or ""
    if not isinstance(name, str) or not name:
        raise HttpError(400, "Missing service name")
    svc = Service(id=str(ci_get(spec, "ID") or name), name=name,
                  address=str(ci_get(spec, "Address") or ""),
                  port=_int_field(ci_get(spec, "Port") or 0, "Port"),
                  tags=list(ci_get(spec, "Tags") or []),
                  meta=dict(ci_get(spec, "Meta") or {}),
                  weights=_parse_weights(ci_get(spec, "Weights")),
                  enable_tag_override=bool(ci_get(spec, "EnableTagOverride", False)))
    defs = []
    single = ci_get(spec, "Check")
    if isinstance(single, dict) and single:
        defs.append(single)
    defs.extend(d for d in (ci_get(spec, "Checks") or []) if isinstance(d, dict))
    checks, explicit = [], set()
    for pos, definition in enumerate(defs, start=1):
        chk = _parse_check(svc, definition, pos, len(defs))
        if ci_get(definition, "Status"):
            explicit.add(chk.id)
        checks.append(chk)
    return svc, checks, explicit


def _int_field(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HttpError(400, f"Request decode failed: {name} must be an integer")
    return value


def _parse_weights(value) -> dict:
    if not value:
        return {"Passing": 1, "Warning": 1}
    passing = _int_field(ci_get(value, "Passing", 1), "Weights.Passing")
    warning = _int_field(ci_get(value, "Warning", 1), "Weights.Warning")
    if passing < 1:
        raise HttpError(400, "Invalid Weights: Passing must be greater than 0")
    return {"Passing": passing, "Warning": warning}


def _check_type(definition: dict) -> str:
    for key, kind in (("TTL", "ttl"), ("HTTP", "http"), ("TCP", "tcp"), ("GRPC", "grpc"),
                      ("Args", "script"), ("ScriptArgs", "script"), ("UDP", "udp"),
                      ("H2PING", "h2ping"), ("AliasService", "alias")):
        if ci_get(definition, key):
            return kind
    raise HttpError(400, "Invalid check: check type is not valid")


def _parse_check(svc: Service, definition: dict, pos: int, total: int) -> Check:
    kind = _check_type(definition)
    if kind == "ttl":
        try:
            if parse_go_duration(str(ci_get(definition, "TTL"))) <= 0:
                raise ValueError
        except ValueError:
            raise HttpError(400, "Invalid check: TTL must be > 0 for TTL checks") from None
    check_id = ci_get(definition, "CheckID") or ci_get(definition, "ID") or ""
    if not check_id:
        check_id = f"service:{svc.id}" + (f":{pos}" if total > 1 else "")
    status = ci_get(definition, "Status") or "critical"
    if status not in CHECK_STATUSES:
        raise HttpError(400, f"Invalid check status: \"{status}\"")
    return Check(id=str(check_id), name=ci_get(definition, "Name") or f"Service '{svc.name}' check",
                 status=status, service_id=svc.id, service_name=svc.name, type=kind,
                 notes=str(ci_get(definition, "Notes") or ""),
                 interval=str(ci_get(definition, "Interval") or ""),
                 timeout=str(ci_get(definition, "Timeout") or ""))


# --------------------------------------------------------------------------
# Consul API endpoints
# --------------------------------------------------------------------------

@dataclass
class CallContext:
    """What an endpoint needs from the connection it runs on."""
    blocking: bool
    refused: object         # () -> bool


class ConsulApi:
    """Routes /v1 requests to endpoint methods returning Response objects."""

    def __init__(self, state: State, config: Config):
        self.state = state
        self.config = config
        self.acl = config.acl
        self.routes = [
            ("GET", "/v1/kv/", True, self.kv_get),
            ("PUT", "/v1/kv/", True, self.kv_put),
            ("DELETE", "/v1/kv/", True, self.kv_delete),
            ("PUT", "/v1/txn", False, self.txn),
            ("GET", "/v1/catalog/service/", True, self.catalog_service),
            ("GET", "/v1/catalog/services", False, self.catalog_services),
            ("GET", "/v1/health/service/", True, self.health_service),
            ("PUT", "/v1/agent/service/register", False, self.agent_register),
            ("PUT", "/v1/agent/service/deregister/", True, self.agent_deregister),
            ("PUT", "/v1/agent/check/pass/", True, self.check_pass),
            ("PUT", "/v1/agent/check/warn/", True, self.check_warn),
            ("PUT", "/v1/agent/check/fail/", True, self.check_fail),
            ("PUT", "/v1/agent/check/update/", True, self.check_update),
            ("GET", "/v1/agent/services", False, self.agent_services),
            ("GET", "/v1/agent/checks", False, self.agent_checks),
            ("GET", "/v1/agent/self", False, self.agent_self),
            ("GET", "/v1/status/leader", False, self.status_leader),
        ]

    # -- dispatch ------------------------------------------------------------

    def handle(self, req: Request, ctx: CallContext) -> Response:
        try:
            self._check_common_params(req)
            path_known = False
            for method, prefix, is_prefix, fn in self.routes:
                if req.path == prefix or (is_prefix and req.path.startswith(prefix)):
                    path_known = True
                    if req.method == method:
                        return fn(req, req.path[len(prefix):], ctx)
            if path_known:
                raise HttpError(405, f"method {req.method} not allowed")
            raise HttpError(404, "404 page not found")
        except HttpError as err:
            return error_response(err)

    def _check_common_params(self, req: Request) -> None:
        dc = req.q("dc")
        if dc and dc != DATACENTER:
            raise HttpError(500, "No path to datacenter")
        if req.q("filter"):
            raise HttpError(400, "?filter= expressions are not supported by the emulator")

    def _query(self, req: Request, ctx: CallContext, reader) -> Response:
        min_index, timeout = self._blocking_params(req) if ctx.blocking else (0, 0.0)
        return self.state.run_query(reader, min_index, timeout, req.path, ctx.refused)

    def _blocking_params(self, req: Request) -> tuple[int, float]:
        raw_index = req.q("index")
        if raw_index in (None, ""):
            return 0, 0.0
        try:
            min_index = int(raw_index)
            if min_index < 0:
                raise ValueError
        except ValueError:
            raise HttpError(400, "Invalid index") from None
        timeout = 0.0
        if req.q("wait"):
            try:
                timeout = parse_go_duration(req.q("wait"))
            except ValueError:
                raise HttpError(400, "Invalid wait time") from None
        if timeout > MAX_WAIT:
            timeout = MAX_WAIT
        elif timeout <= 0:
            timeout = DEFAULT_WAIT
        if self.config.jitter:
            timeout += random.uniform(0, timeout / JITTER_FRACTION)
        return min_index, timeout

    def _filtered(self, dropped: bool) -> dict:
        return {"X-Consul-Results-Filtered-By-Acls": "true"} if dropped else {}

    # -- KV ------------------------------------------------------------------

    def kv_get(self, req: Request, key: str, ctx: CallContext) -> Response:
        if not (req.has("keys") or req.has("recurse")) and not key:
            raise HttpError(400, "Missing key name")
        who = self.acl.resolve(req.token())
        if req.has("keys"):
            sep = req.q("separator", "")
            return self._query(req, ctx, lambda: self._kv_keys(key, sep, who))
        if req.has("recurse"):
            return self._query(req, ctx, lambda: self._kv_list(key, who))
        self.acl.require(who, "key", key, "read")
        return self._query(req, ctx, lambda: self._kv_single(key, req.has("raw")))

    def _kv_single(self, key: str, raw: bool) -> Response:
        idx, entry = self.state.kv_get(key)
        if entry is None:
            return empty_404(idx)
        if raw:
            return Response(200, entry.value, idx, TEXT_CT, {"X-Content-Type-Options": "nosniff"})
        return json_response([entry.to_json()], idx)

    def _kv_visible(self, prefix: str, who: Principal) -> tuple[int, list[KVEntry], dict]:
        idx, entries = self.state.kv_list(prefix)
        visible = [e for e in entries if self.acl.allows(who, "key", e.key)]
        return idx, visible, self._filtered(len(visible) < len(entries))

    def _kv_list(self, prefix: str, who: Principal) -> Response:
        idx, visible, headers = self._kv_visible(prefix, who)
        if not visible:
            return empty_404(idx, headers)
        return json_response([e.to_json() for e in visible], idx, headers=headers)

    def _kv_keys(self, prefix: str, sep: str, who: Principal) -> Response:
        idx, visible, headers = self._kv_visible(prefix, who)
        names: list[str] = []
        for entry in visible:
            name = entry.key
            if sep:
                cut = name.find(sep, len(prefix))
                if cut >= 0:
                    name = name[:cut + len(sep)]
            if not names or names[-1] != name:
                names.append(name)
        if not names:
            return empty_404(idx, headers)
        return json_response(names, idx, headers=headers)

    def kv_put(self, req: Request, key: str, ctx: CallContext) -> Response:
        if not key:
            raise HttpError(400, "Missing key name")
        if req.has("acquire") or req.has("release"):
            raise HttpError(400, "sessions (acquire/release) are not supported by the emulator")
        who = self.acl.resolve(req.token())
        self.acl.require(who, "key", key, "write")
        flags = parse_uint(req.q("flags"), "flags") if req.has("flags") else 0
        cas = parse_uint(req.q("cas"), "cas") if req.has("cas") else None
        ok = self.state.kv_put(key, req.body, flags, cas)
        return json_response(ok, self.state.current_index())

    TXN_MAX_OPS = 64

    def txn(self, req: Request, _rest: str, ctx: CallContext) -> Response:
        try:
            body = json.loads(req.body or b"null")
        except ValueError as e:
            raise HttpError(400, f"Failed to parse body: {e}")
        if not isinstance(body, list):
            raise HttpError(400, "Failed to parse body: expected a list of operations")
        if len(body) > self.TXN_MAX_OPS:
            raise HttpError(413, f"Transaction contains too many operations "
                                 f"({len(body)} > {self.TXN_MAX_OPS})")
        who = self.acl.resolve(req.token())
        ops = []
        for op in body:
            kv = op.get("KV") if isinstance(op, dict) else None
            if not isinstance(kv, dict):
                raise HttpError(400, "only KV operations are supported by the emulator")
            verb, key = kv.get("Verb"), kv.get("Key", "")
            if verb not in ("set", "delete", "delete-tree"):
                raise HttpError(400, f"KV verb {verb!r} is not supported by the emulator")
            if not key and verb != "delete-tree":
                raise HttpError(400, "Missing key name")
            self.acl.require(who, "key", key, "write")
            value = base64.b64decode(kv.get("Value") or "")
            ops.append((verb, key, value, int(kv.get("Flags") or 0)))
        idx = self.state.kv_txn(ops)
        results = [{"KV": {"Key": k, "Flags": f, "CreateIndex": idx, "ModifyIndex": idx,
                           "LockIndex": 0, "Value": None}}
                   for v, k, _, f in ops if v == "set"]
        return json_response({"Results": results or None, "Errors": None}, idx)

    def kv_delete(self, req: Request, key: str, ctx: CallContext) -> Response:
        who = self.acl.resolve(req.token())
        if req.has("recurse"):
            self.acl.require(who, "key", key, "write")
            self.state.kv_delete_tree(key)
            return json_response(True, self.state.current_index())
        if not key:
            raise HttpError(400, "Missing key name")
        self.acl.require(who, "key", key, "write")
        cas = parse_uint(req.q("cas"), "cas") if req.has("cas") else None
        ok = self.state.kv_delete(key, cas)
        return json_response(ok, self.state.current_index())

    # -- catalog / health ----------------------------------------------------

    def _service_entries(self, name: str, req: Request, who: Principal):
        services, checks = self.state.catalog_snapshot()
        tags = req.query.get("tag", [])
        matched = [s for s in services if s.name == name and s.has_tags(tags)]
        if matched and not self.acl.allows(who, "service", name):
            return [], checks, self._filtered(True)
        return matched, checks, {}

    def catalog_service(self, req: Request, name: str, ctx: CallContext) -> Response:
        if not name:
            raise HttpError(400, "Missing service name")
        who = self.acl.resolve(req.token())

        def reader() -> Response:
            idx = self.state.service_query_index(name)
            matched, _, headers = self._service_entries(name, req, who)
            return json_response([catalog_entry_json(s) for s in matched], idx, headers=headers)
        return self._query(req, ctx, reader)

    def health_service(self, req: Request, name: str, ctx: CallContext) -> Response:
        if not name:
            raise HttpError(400, "Missing service name")
        try:
            passing = parse_go_bool(req.q("passing")) if req.has("passing") else False
        except ValueError:
            raise HttpError(400, "Invalid value for ?passing") from None
        who = self.acl.resolve(req.token())

        def reader() -> Response:
            idx = self.state.service_query_index(name)
            matched, checks, headers = self._service_entries(name, req, who)
            out = []
            for svc in matched:
                chks = health_checks_json(svc, checks)
                if passing and any(c["Status"] != "passing" for c in chks):
                    continue
                out.append({"Node": node_json(), "Service": health_service_json(svc),
                            "Checks": chks})
            return json_response(out, idx, headers=headers)
        return self._query(req, ctx, reader)

    def catalog_services(self, req: Request, _rest: str, ctx: CallContext) -> Response:
        who = self.acl.resolve(req.token())

        def reader() -> Response:
            services, _ = self.state.catalog_snapshot()
            out: dict[str, list] = {}
            dropped = False
            for svc in services:
                if not self.acl.allows(who, "service", svc.name):
                    dropped = True
                    continue
                out.setdefault(svc.name, [])
                out[svc.name] = sorted(set(out[svc.name]) | set(svc.tags))
            idx = max(1, self.state.catalog_index)
            return json_response(out, idx, headers=self._filtered(dropped))
        return self._query(req, ctx, reader)

    # -- agent ------------------------------------------------------------------

    def agent_register(self, req: Request, _rest: str, ctx: CallContext) -> Response:
        who = self.acl.resolve(req.token())
        svc, checks, explicit = parse_service_definition(req.body)
        self.acl.require(who, "service", svc.name, "write")
        self.state.register_service(svc, checks, explicit)
        return Response(200, b"", self.state.current_index(), None)

    def agent_deregister(self, req: Request, service_id: str, ctx: CallContext) -> Response:
        who = self.acl.resolve(req.token())
        self.acl.require(who, "service", service_id, "write")
        if not self.state.deregister_service(service_id):
            raise HttpError(404, f"Unknown service ID \"{service_id}\". Ensure that the "
                                 f"service ID is passed, not the service name.")
        return Response(200, b"", self.state.current_index(), None)

    def _set_check(self, req: Request, check_id: str, status: str, output: str) -> Response:
        who = self.acl.resolve(req.token())
        chk = self.state.find_check(check_id)
        if chk is None:
            raise HttpError(404, f"Unknown check ID \"{check_id}\". Ensure that the check ID "
                                 f"is passed, not the check name.")
        self.acl.require(who, "service", chk.service_name, "write")
        self.state.update_check(check_id, status, output)
        return Response(200, b"", self.state.current_index(), None)

    def check_pass(self, req: Request, check_id: str, ctx: CallContext) -> Response:
        return self._set_check(req, check_id, "passing", req.q("note", ""))

    def check_warn(self, req: Request, check_id: str, ctx: CallContext) -> Response:
        return self._set_check(req, check_id, "warning", req.q("note", ""))

    def check_fail(self, req: Request, check_id: str, ctx: CallContext) -> Response:
        return self._set_check(req, check_id, "critical", req.q("note", ""))

    def check_update(self, req: Request, check_id: str, ctx: CallContext) -> Response:
        try:
            spec = json.loads(req.body or b"{}")
        except ValueError as exc:
            raise HttpError(400, f"Request decode failed: {exc}") from None
        if not isinstance(spec, dict):
            raise HttpError(400, "Request decode failed: expected a JSON object")
        status = ci_get(spec, "Status", "")
        if status not in CHECK_STATUSES:
            raise HttpError(400, f"Invalid check status: \"{status}\"")
        return self._set_check(req, check_id, status, str(ci_get(spec, "Output", "") or ""))

    def agent_services(self, req: Request, _rest: str, ctx: CallContext) -> Response:
        who = self.acl.resolve(req.token())
        services, _ = self.state.catalog_snapshot()
        out = {s.id: agent_service_json(s) for s in services
               if not s.builtin and self.acl.allows(who, "service", s.name)}
        return json_response(out, self.state.current_index())

    def agent_checks(self, req: Request, _rest: str, ctx: CallContext) -> Response:
        who = self.acl.resolve(req.token())
        services, checks = self.state.catalog_snapshot()
        tags = {s.id: s.tags for s in services}
        out = {c.id: check_json(c, tags.get(c.service_id, [])) for c in checks.values()
               if self.acl.allows(who, "service", c.service_name)}
        return json_response(out, self.state.current_index())

    def agent_self(self, req: Request, _rest: str, ctx: CallContext) -> Response:
        who = self.acl.resolve(req.token())
        self.acl.require(who, "agent", NODE_NAME, "read")
        body = {"Config": {"Datacenter": DATACENTER, "NodeName": NODE_NAME, "NodeID": NODE_ID,
                           "Server": True, "Revision": "emulator", "Version": VERSION},
                "Member": {"Name": NODE_NAME, "Addr": NODE_ADDR, "Port": 8301,
                           "Tags": {"dc": DATACENTER, "role": "consul"}, "Status": 1}}
        return json_response(body, self.state.current_index())

    def status_leader(self, req: Request, _rest: str, ctx: CallContext) -> Response:
        return json_response(LEADER, self.state.current_index())


# --------------------------------------------------------------------------
# Test control API (/_emu/)
# --------------------------------------------------------------------------

class ControlApi:
    def __init__(self, state: State, has_control_listener: bool):
        self.state = state
        self.has_control_listener = has_control_listener
        self.routes = {
            ("GET", "/_emu/stats"): self.stats,
            ("POST", "/_emu/reset_stats"): self.reset_stats,
            ("POST", "/_emu/fault"): self.add_fault,
            ("POST", "/_emu/clear_faults"): self.clear_faults,
            ("GET", "/_emu/faults"): self.faults,
            ("POST", "/_emu/set_index"): self.set_index,
        }

    def handle(self, method: str, path: str, body: bytes, conn: ConnInfo) -> Response:
        method = "POST" if method == "PUT" else method
        fn = self.routes.get((method, path.rstrip("/") or path))
        try:
            if fn is None:
                known = {p for _, p in self.routes}
                raise HttpError(405 if path in known else 404, f"no control endpoint {method} {path}")
            return fn(self._json(body), conn)
        except HttpError as err:
            return error_response(err)

    @staticmethod
    def _json(body: bytes) -> dict:
        if not body.strip():
            return {}
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise HttpError(400, f"bad JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise HttpError(400, "expected a JSON object")
        return obj

    @staticmethod
    def _ok(obj=None) -> Response:
        return json_response({"ok": True} if obj is None else obj, None)

    def stats(self, _body: dict, _conn) -> Response:
        return self._ok(self.state.stats_json())

    def reset_stats(self, _body: dict, _conn) -> Response:
        self.state.reset_stats()
        return self._ok()

    def faults(self, _body: dict, _conn) -> Response:
        return self._ok(self.state.list_faults())

    def add_fault(self, body: dict, conn: ConnInfo) -> Response:
        spec = self._fault_spec(body)
        fault = self.state.add_fault(spec, conn)
        self._sync_listener()
        return self._ok({"id": fault.id})

    def clear_faults(self, body: dict, _conn) -> Response:
        fault_id = body.get("id")
        if fault_id is not None and not isinstance(fault_id, int):
            raise HttpError(400, "id must be an integer")
        dropped = self.state.clear_faults(fault_id)
        self._sync_listener()
        return self._ok({"ok": True, "cleared": dropped})

    def set_index(self, body: dict, _conn) -> Response:
        value = body.get("index")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HttpError(400, "index must be an integer >= 1")
        self.state.set_index(value)
        return self._ok({"ok": True, "index": value})

    def _sync_listener(self) -> None:
        """With --control-listen, wait until the main listener matches the faults."""
        if self.has_control_listener:
            self.state.wait_listener(not self.state.listener_should_be_down(), timeout=5.0)

    @staticmethod
    def _fault_spec(body: dict) -> dict:
        mode = body.get("mode")
        if mode not in FAULT_MODES:
            raise HttpError(400, f"mode must be one of {', '.join(FAULT_MODES)}")
        count = body.get("count", -1)
        if isinstance(count, bool) or not isinstance(count, int) or count == 0 or count < -1:
            raise HttpError(400, "count must be -1 or a positive integer")
        prefix = body.get("path_prefix", "")
        method = body.get("method")
        if not isinstance(prefix, str) or (method is not None and not isinstance(method, str)):
            raise HttpError(400, "path_prefix and method must be strings")
        params = {k: v for k, v in body.items()
                  if k not in ("mode", "count", "path_prefix", "method")}
        ControlApi._validate_params(mode, params)
        return {"mode": mode, "path_prefix": prefix, "method": method,
                "remaining": count, "params": params}

    @staticmethod
    def _validate_params(mode: str, params: dict) -> None:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)
        if mode == "delay":
            delay = params.setdefault("delay_ms", 1000)
            if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
                raise HttpError(400, "delay_ms must be a number >= 0")
        if mode in ("status", "body"):
            status = params.setdefault("status", 500 if mode == "status" else 200)
            if not is_int(status) or not 100 <= status <= 599:
                raise HttpError(400, "status must be an integer in 100..599")
            body = params.setdefault("body", "" if mode == "body" else None)
            if body is not None and not isinstance(body, str):
                raise HttpError(400, "body must be a string")
        if mode == "body":
            headers = params.setdefault("headers", {})
            if not isinstance(headers, dict) or not all(
                    isinstance(k, str) and (v is None or isinstance(v, (str, int)))
                    for k, v in headers.items()):
                raise HttpError(400, "headers must map names to strings or null")
        if mode == "index_backwards":
            index = params.setdefault("index", 1)
            if not is_int(index) or index < 0:
                raise HttpError(400, "index must be an integer >= 0")


# --------------------------------------------------------------------------
# Faults that replace or alter an answer
# --------------------------------------------------------------------------

def apply_fault(fault: Fault | None, resp: Response) -> Response:
    """Turn a normal answer into the faulty one described by ``fault``."""
    if fault is None or fault.mode == "delay":
        return resp
    p = fault.params
    if fault.mode == "status":
        text = p.get("body")
        body = (text if text is not None else f"emulated fault: status {p['status']}").encode()
        return Response(p["status"], body, resp.index, TEXT_CT)
    if fault.mode == "malformed":
        return Response(200, MALFORMED_BODY, resp.index, JSON_CT)
    if fault.mode == "body":
        return Response(p["status"], p["body"].encode(), resp.index, JSON_CT,
                        {k: (None if v is None else str(v)) for k, v in p["headers"].items()})
    if fault.mode == "index_backwards" and resp.index is not None:
        resp.index = p["index"]
        return resp
    if fault.mode == "truncate":
        if len(resp.body) < 2:
            resp.body = b'[{"LockIndex":0,"Key":"truncated","Flags":0,"Value":null}]'
        resp.truncate = True
        return resp
    return resp


# --------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    # Like Consul (Go sets TCP_NODELAY on every connection): without it, the
    # separate header and body writes meet the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "consul-emulator"
    sys_version = ""

    # -- connection lifecycle ------------------------------------------------

    def setup(self):
        super().setup()
        self.emu: Emulator = self.server.emulator
        self.conn = self.emu.state.conn_open(self.connection, self.server.backdoor)

    def handle(self):
        try:
            super().handle()
        except (OSError, ValueError):
            pass                    # BrokenPipe, ConnectionReset, closed socket

    def finish(self):
        try:
            super().finish()
        except (OSError, ValueError):
            pass
        finally:
            self.emu.state.conn_close(self.conn)

    def log_message(self, fmt, *args):
        if self.emu.config.verbose:
            super().log_message(fmt, *args)

    # -- request entry points ------------------------------------------------

    def do_GET(self):
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_GET

    def _dispatch(self):
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query, keep_blank_values=True)
        control = path.startswith("/_emu/")
        self.emu.state.note_request(self.conn, self.command, path, control)
        limit = CONTROL_MAX_BODY if control else self.emu.config.max_body
        body = self._read_body(limit)
        if body is None:
            return
        if control:
            self._send(self.emu.control.handle(self.command, path, body, self.conn))
            return
        self._serve_api(Request(self.command, path, query, self.headers, body))

    def _serve_api(self, req: Request):
        fault = None if self.server.backdoor else self.emu.state.take_fault(req.method, req.path)
        mode = fault.mode if fault else None
        try:
            if mode == "refuse":
                raise ResetConnection()
            if mode == "close":
                self.close_connection = True
                return
            if mode == "hang":
                self.emu.state.wait_hang(fault, self._client_alive)
                self.close_connection = True
                return
            if mode == "delay":
                self.emu.state.sleep(fault.params["delay_ms"] / 1000.0)
            ctx = CallContext(blocking=mode not in IMMEDIATE_FAULTS,
                              refused=lambda: self._refused(req))
            resp = apply_fault(fault, self.emu.api.handle(req, ctx))
            self._send(resp)
        except ResetConnection:
            self._reset()

    def _refused(self, req: Request) -> bool:
        return not self.server.backdoor and self.emu.state.refusing(req.method, req.path)

    # -- body reading ---------------------------------------------------------

    def _read_body(self, limit: int) -> bytes | None:
        """Read the request body; on error answer and return None."""
        try:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                body = self._read_chunked(limit)
            else:
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0:
                    raise ValueError
                if length > limit:
                    raise OverflowError(length)
                body = self.rfile.read(length)
                if len(body) < length:
                    self.close_connection = True
                    return None
            return body
        except OverflowError as exc:
            msg = f"Request body({exc.args[0]} bytes) too large, max size: {limit} bytes"
            self._send(Response(413, msg.encode(), None, TEXT_CT, close=True))
        except ValueError:
            self._send(Response(400, b"bad request body framing", None, TEXT_CT, close=True))
        return None

    def _read_chunked(self, limit: int) -> bytes:
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"x", 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise OverflowError(total)
            parts.append(self.rfile.read(size))
            self.rfile.readline(16)
        while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
            pass                    # trailers
        return b"".join(parts)

    # -- socket helpers --------------------------------------------------------

    def _client_alive(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return True
            return self.connection.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    def _reset(self):
        """Drop the connection with an RST (SO_LINGER 0)."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()     # really closed when rfile is closed in finish()
        except OSError:
            pass

    # -- response writing ------------------------------------------------------

    def _header_list(self, resp: Response, length: int) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        if resp.content_type:
            headers.append(("Content-Type", resp.content_type))
        if resp.index is not None:
            headers += [("Vary", "Accept-Encoding"),
                        ("X-Consul-Default-Acl-Policy", self.emu.config.acl.policy_name),
                        ("X-Consul-Index", str(resp.index)),
                        ("X-Consul-Knownleader", "true"),
                        ("X-Consul-Lastcontact", "0")]
        headers.append(("Date", self.date_time_string()))
        headers.append(("Content-Length", str(length)))
        for name, value in resp.headers.items():
            headers = [(k, v) for k, v in headers if k.lower() != name.lower()]
            if value is not None:
                headers.append((name, value))
        if resp.close or resp.truncate:
            headers.append(("Connection", "close"))
        return headers

    def _send(self, resp: Response):
        self.log_request(resp.status, len(resp.body))
        self.send_response_only(resp.status)
        for name, value in self._header_list(resp, len(resp.body)):
            self.send_header(name, value)
        self.end_headers()
        if resp.truncate:
            self.wfile.write(resp.body[:len(resp.body) // 2])
            self.close_connection = True
            return
        self.wfile.write(resp.body)
        if resp.close:
            self.close_connection = True


class EmuHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, emulator: "Emulator", backdoor: bool):
        self.emulator = emulator
        self.backdoor = backdoor
        super().__init__(address, Handler)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)   # skip the slow getfqdn()
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        if self.emulator.config.verbose:
            super().handle_error(request, client_address)

    # -- Consul's per-client connection limit (go-connlimit in http.Server.ConnState)

    def verify_request(self, request, client_address):
        if self.backdoor:
            return True
        limit = self.emulator.config.max_conns_per_client
        if self.emulator.state.admit(request, client_address[0], limit):
            return True
        # over the limit: the 429 at once (10 ms to write it), then close without
        # reading the request (a request already received makes the close a reset)
        try:
            request.settimeout(0.01)
            request.sendall(TOO_MANY_CONNS)
        except OSError:
            pass
        return False

    def shutdown_request(self, request):
        counted = request in self.emulator.state.limited
        self.emulator.state.release(request)
        if counted or self.backdoor:
            super().shutdown_request(request)
        else:
            self.close_request(request)     # a refused one: Go's plain Close()


# --------------------------------------------------------------------------
# Process: listeners, supervisor, signals
# --------------------------------------------------------------------------

class Emulator:
    def __init__(self, config: Config, listen: tuple[str, int],
                 control_listen: tuple[str, int] | None):
        self.config = config
        self.state = State()
        self.state.max_conns_per_client = config.max_conns_per_client
        self.api = ConsulApi(self.state, config)
        self.control = ControlApi(self.state, control_listen is not None)
        self.host, self.port = listen
        self.control_addr = control_listen
        self.main_server: EmuHTTPServer | None = None
        self.control_server: EmuHTTPServer | None = None
        self.stop_requested = False

    def _start(self, address, backdoor: bool) -> EmuHTTPServer:
        server = EmuHTTPServer(address, self, backdoor)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return server

    def start(self) -> None:
        self.main_server = self._start((self.host, self.port), backdoor=False)
        self.port = self.main_server.server_address[1]
        print(f"consul-emulator listening on {self.host}:{self.port}", flush=True)
        if self.control_addr:
            self.control_server = self._start(self.control_addr, backdoor=True)
            host, port = self.control_server.server_address[:2]
            print(f"consul-emulator control on {host}:{port}", flush=True)

    def _stop_main(self) -> None:
        server, self.main_server = self.main_server, None
        server.shutdown()
        server.server_close()

    def _restart_main(self) -> None:
        for _ in range(100):
            try:
                self.main_server = self._start((self.host, self.port), backdoor=False)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"cannot listen again on {self.host}:{self.port}")

    def _reconcile_listener(self) -> None:
        """With --control-listen, close or reopen the main socket for refuse faults."""
        if self.control_server is None:
            return
        down = self.state.listener_should_be_down()
        if down and self.main_server is not None:
            self._stop_main()
        elif not down and self.main_server is None:
            self._restart_main()
        self.state.set_listener_up(self.main_server is not None)

    def run(self) -> None:
        while not self.stop_requested:
            with self.state.cond:
                self.state.cond.wait(0.1)
            self._reconcile_listener()
        self.state.stop()
        for server in (self.main_server, self.control_server):
            if server is not None:
                server.shutdown()
                server.server_close()

    def request_stop(self, *_args) -> None:
        self.stop_requested = True     # no locking: runs inside a signal handler


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if not host.startswith("127."):
        raise argparse.ArgumentTypeError("only loopback (127.x.x.x) addresses are allowed")
    return host, int(port)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Consul HTTP API emulator for tests")
    parser.add_argument("--listen", required=True, type=parse_address,
                        help="127.0.0.1:PORT (PORT 0 picks a free port)")
    parser.add_argument("--acl-token", action="append", default=[], metavar="TOKEN[=PREFIX]",
                        help="accepted ACL token, optionally limited to a KV prefix")
    parser.add_argument("--acl-default", choices=("deny", "allow"), default=None,
                        help="ACL default policy (deny when tokens are given)")
    parser.add_argument("--jitter", choices=("on", "off"), default="on",
                        help="add up to wait/16 to blocking waits, like Consul")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY,
                        help="largest accepted request body in bytes")
    parser.add_argument("--max-conns-per-client", type=int,
                        default=DEFAULT_MAX_CONNS_PER_CLIENT, metavar="N",
                        help="Consul's limits.http_max_conns_per_client (0: no limit)")
    parser.add_argument("--control-listen", type=parse_address, default=None,
                        help="extra listener for /_emu/ that survives 'refuse' faults")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        acl = Acl.from_args(args.acl_token, args.acl_default)
    except ValueError as exc:
        print(f"consul-emulator: {exc}", file=sys.stderr)
        return 2
    if args.max_conns_per_client < 0:
        print("consul-emulator: --max-conns-per-client must be 0 or more", file=sys.stderr)
        return 2
    config = Config(acl=acl, jitter=args.jitter == "on", max_body=args.max_body,
                    verbose=args.verbose, max_conns_per_client=args.max_conns_per_client)
    emulator = Emulator(config, args.listen, args.control_listen)
    signal.signal(signal.SIGTERM, emulator.request_stop)
    signal.signal(signal.SIGINT, emulator.request_stop)
    emulator.start()
    emulator.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
