#!/usr/bin/env python3
"""Kubernetes API server emulator (EndpointSlices only) for the ngx-stream-upsync tests.

Standard library only (Python >= 3.11).  No API server can be installed where the
suite runs, so this copies what a client of ``discovery.k8s.io/v1`` EndpointSlices
can observe, as the Kubernetes API documentation describes it ("API Concepts":
efficient detection of changes, watch bookmarks, resource versions; the
EndpointSlice reference).

Usage::

    python3 k8s_emulator.py --listen 127.0.0.1:0 [--control-listen 127.0.0.1:0]
        [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]
        [--token TOKEN]... [--admin-token TOKEN] [--bookmark-interval SECONDS]
        [--default-watch-timeout SECONDS] [--history N] [--verbose]

Once ready it prints ``k8s-emulator listening on 127.0.0.1:PORT`` (and, with
--control-listen, ``k8s-emulator control on 127.0.0.1:PORT``).  SIGTERM or SIGINT
makes it exit with status 0.

What is emulated
----------------
* ``/apis/discovery.k8s.io/v1/namespaces/NS/endpointslices``: GET (list), GET with
  ``watch=1`` or ``watch=true`` (watch), POST (create; ``metadata.name`` or
  ``generateName``), DELETE (delete collection, with ``labelSelector``: one DELETED
  event per slice, written to each watch in one piece), and
  ``.../endpointslices/NAME``: GET, PUT (replace; a
  ``metadata.resourceVersion`` that is not the current one gets 409 Conflict), DELETE.
  Writes are validated as the API server does for the fields a reader uses
  (addressType IPv4/IPv6/FQDN, 1-100 addresses of that type per endpoint, port numbers
  1-65535, protocol TCP/UDP/SCTP, boolean conditions); invalid objects get 422.
* ``labelSelector`` with equality requirements (``k=v``, ``k==v``, ``k!=v``, ``k``,
  ``!k``; comma-separated).  Set-based requirements get 400.
* One global resourceVersion (an integer sent as a string) that every write moves.
  A list answers ``metadata.resourceVersion`` = the current one; list items carry no
  ``kind``/``apiVersion`` (watch objects do), as the real server answers.
* Watches: chunked ``application/json``, one JSON event per line
  (``{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}``).  From
  ``resourceVersion`` RV: every matching event after RV, then live events.  RV absent
  or ``0``: a synthetic ADDED per current object first.  ``allowWatchBookmarks=true``:
  a BOOKMARK every --bookmark-interval seconds (default 60) carrying the current
  resourceVersion in an otherwise empty EndpointSlice, as the real server sends it.
  ``timeoutSeconds``: the watch ends cleanly (last chunk) after that long; otherwise
  after --default-watch-timeout (default 1800).  A DELETED event carries the object
  with the deletion's resourceVersion.
* "Too old resource version": events up to the compaction point are gone (the
  history also keeps at most --history events).  A watch from an older RV gets either
  HTTP 410 with a Status body (form ``status``) or a 200 stream whose only event is an
  ERROR with a Status of code 410 (form ``event``), as the watch cache and etcd
  answer; see ``/_emu/compact``.
* Authentication: with --token or --admin-token, every ``/api``/``/apis`` request needs
  ``Authorization: Bearer T`` with an accepted token, else 401 with an Unauthorized
  Status.  A token is checked when a request starts only: an open watch outlives the
  token's revocation, as on a real server.  Tokens listed as forbidden authenticate
  but get 403 (RBAC denies list/watch).  ``/healthz``, ``/readyz``, ``/livez`` and
  ``/version`` need no token.
* TLS with --tls-cert/--tls-key (handshake in the connection's own thread), client
  certificates required with --tls-client-ca.

Not emulated: other resources and API groups, namespaces as objects (any namespace
exists), pagination (``limit``/``continue`` are ignored: lists are whole), field
selectors, PATCH, server-side apply, protobuf, ``resourceVersionMatch``,
``sendInitialEvents``, finalizers, admission, and the EndpointSlice controller (slices
are written by the test, as a Service without a selector has them).

Test control API (not part of Kubernetes, never authenticated)
--------------------------------------------------------------
Bodies are JSON; POST and PUT are both accepted.  The control API is served on the
main port under ``/_emu/`` and, with --control-listen, on a plain-http second
listener that also serves the Kubernetes API without faults, authentication or
statistics (the harness writes slices there).

``GET /_emu/stats``
    ``{"requests": {"LIST": n, "WATCH": n, "GET": n, "POST": n, "PUT": n, "DELETE": n},
    "requests_total", "watches_open", "watches_total", "watch_starts": [RV, ...] (last 50,
    "" for none), "watch_log": [{"labelSelector", "resourceVersion", "token"}, ...] (last 50),
    "tokens": {token: n}, "last_token", "unauthorized", "forbidden",
    "expired_status", "expired_event", "resource_version", "compacted",
    "connections_open", "connections_total"}`` for requests on the main listener.
``POST /_emu/reset_stats``
    Zeroes the counters (not the gauges).
``POST /_emu/tokens``  ``{"tokens": [...], "forbidden": [...]}``
    Replaces the accepted tokens (the admin token stays accepted).
``POST /_emu/compact``  ``{"form": "status"|"event", "open_watches": "keep"|"expire"}``
    Forgets every event up to now: watches from an older resourceVersion are too old,
    answered in ``form`` (default ``status``).  ``open_watches: "expire"`` also sends
    every open watch an ERROR event with code 410 and ends it (an etcd compaction that
    overtakes a slow watcher).
``POST /_emu/end_watches``  ``{"how": "clean"|"abort"}``
    Ends every open watch now: ``clean`` with the last chunk (a quiet end),
    ``abort`` by closing the connection mid-stream.
``POST /_emu/raw_put``  ``{"namespace": NS, "object": {...}}``
    Stores an EndpointSlice without validation (bad data a reader must survive) and
    sends ADDED or MODIFIED.
``POST /_emu/fault``  ``{"mode", "verb": "list"|"watch"|"any", "count": -1, ...}``
    Adds a fault for requests on the main listener to endpointslices (``verb`` any:
    list, watch or get); the oldest matching fault wins; after ``count`` requests it
    expires (-1: until cleared).  Answers ``{"id": n}``.  Modes:

    ``delay`` (``delay_ms``)      answer normally after that long
    ``status`` (``status`` 500, ``body``)  answer that status (a Status body by default)
    ``malformed``                 list: 200 with invalid JSON; watch: a 200 stream
                                  whose first line is not JSON
    ``close``                     read the request, close without answering
    ``hang``                      never answer until the fault is cleared
    ``close_mid_stream`` (``after_events`` 0)  watch: the head and that many events,
                                  then the connection closes without the last chunk;
                                  list: half of a Content-Length body, then close
    ``end_stream`` (``after_ms`` 0)  watch: ends cleanly that long after it started
    ``gone`` (``form`` status|event)  watch: too old, whatever the resourceVersion
``POST /_emu/clear_faults``  (optional ``{"id": n}``)
    Removes all faults, or one; releases hung requests.
``GET /_emu/faults``
    Lists the active faults.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import re
import select
import signal
import socket
import ssl
import string
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

GROUP_PATH = "/apis/discovery.k8s.io/v1"
API_VERSION = "discovery.k8s.io/v1"
SERVICE_LABEL = "kubernetes.io/service-name"
FIRST_RV = 1000
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SLICES_RE = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices(?:/([^/]+))?/?$")
FAULT_MODES = ("delay", "status", "malformed", "close", "hang", "close_mid_stream",
               "end_stream", "gone")
POLL = 0.05   # how often a parked watch looks at its socket and the clock


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def status_obj(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    s = {"kind": "Status", "apiVersion": "v1", "metadata": {},
         "status": "Success" if code < 400 else "Failure",
         "message": message, "reason": reason, "code": code}
    if details:
        s["details"] = details
    if code < 400:
        del s["reason"]
    return s


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return status_obj(self.code, self.reason, self.message)


# --------------------------------------------------------------------------
# Label selectors and validation
# --------------------------------------------------------------------------

def parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    """Equality-based requirements: (op, key, value) with op in = != exists !exists."""
    reqs = []
    if not text:
        return reqs
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if " in " in part or " notin " in part or "(" in part:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: set-based selector {part!r} is not supported by the emulator")
        if "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append(("!=", k.strip(), v.strip()))
        elif "==" in part:
            k, v = part.split("==", 1)
            reqs.append(("=", k.strip(), v.strip()))
        elif "=" in part:
            k, v = part.split("=", 1)
            reqs.append(("=", k.strip(), v.strip()))
        elif part.startswith("!"):
            reqs.append(("!exists", part[1:].strip(), None))
        else:
            reqs.append(("exists", part, None))
    return reqs


def selector_matches(reqs, labels: dict) -> bool:
    for op, k, v in reqs:
        have = labels.get(k)
        if op == "=" and have != v:
            return False
        if op == "!=" and have == v:
            return False
        if op == "exists" and have is None:
            return False
        if op == "!exists" and have is not None:
            return False
    return True


def validate_slice(obj, name_in_path: str | None) -> None:
    """The checks the API server makes on the fields a reader relies on (422 otherwise)."""
    def invalid(msg):
        raise ApiError(422, "Invalid", f"EndpointSlice.discovery.k8s.io \"{name_in_path or ''}\" is invalid: {msg}")
    if not isinstance(obj, dict):
        raise ApiError(400, "BadRequest", "the body is not a JSON object")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        invalid("metadata: Required value")
    at = obj.get("addressType")
    if at not in ("IPv4", "IPv6", "FQDN"):
        invalid(f"addressType: Unsupported value: {at!r}: supported values: \"FQDN\", \"IPv4\", \"IPv6\"")
    eps = obj.get("endpoints")
    if eps is None:
        eps = []
    if not isinstance(eps, list):
        invalid("endpoints: must be a list")
    for i, ep in enumerate(eps):
        if not isinstance(ep, dict):
            invalid(f"endpoints[{i}]: must be an object")
        addrs = ep.get("addresses")
        if not isinstance(addrs, list) or not 1 <= len(addrs) <= 100:
            invalid(f"endpoints[{i}].addresses: must contain at least 1 and at most 100 addresses")
        for j, a in enumerate(addrs):
            try:
                ip = ipaddress.ip_address(a) if at != "FQDN" else None
            except (ValueError, TypeError):
                invalid(f"endpoints[{i}].addresses[{j}]: Invalid value: {a!r}: must be a valid IP address")
            if at == "IPv4" and ip is not None and ip.version != 4:
                invalid(f"endpoints[{i}].addresses[{j}]: Invalid value: {a!r}: must be a valid IPv4 address")
            if at == "IPv6" and ip is not None and ip.version != 6:
                invalid(f"endpoints[{i}].addresses[{j}]: Invalid value: {a!r}: must be a valid IPv6 address")
        cond = ep.get("conditions")
        if cond is not None:
            if not isinstance(cond, dict):
                invalid(f"endpoints[{i}].conditions: must be an object")
            for k in ("ready", "serving", "terminating"):
                if cond.get(k) is not None and not isinstance(cond.get(k), bool):
                    invalid(f"endpoints[{i}].conditions.{k}: must be a boolean")
    ports = obj.get("ports")
    if ports is not None:
        if not isinstance(ports, list):
            invalid("ports: must be a list")
        for i, p in enumerate(ports):
            if not isinstance(p, dict):
                invalid(f"ports[{i}]: must be an object")
            n = p.get("port")
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 65535):
                invalid(f"ports[{i}].port: Invalid value: {n!r}: must be between 1 and 65535, inclusive")
            if p.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
                invalid(f"ports[{i}].protocol: Unsupported value: {p.get('protocol')!r}")
            if p.get("name") not in (None, "") and not DNS_LABEL.match(str(p.get("name"))):
                invalid(f"ports[{i}].name: Invalid value: {p.get('name')!r}")


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------

@dataclass
class Fault:
    id: int
    mode: str
    verb: str = "any"
    count: int = -1
    spec: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"id": self.id, "mode": self.mode, "verb": self.verb, "count": self.count, **self.spec}


class Watch:
    """One open watch: its filter and the events queued for it."""

    def __init__(self, ns: str, reqs):
        self.ns = ns
        self.reqs = reqs
        self.queue: list[dict] = []
        self.end: str | None = None     # "clean" | "abort" | "expire"

    def matches(self, ns: str, obj: dict) -> bool:
        return ns == self.ns and selector_matches(self.reqs, obj.get("metadata", {}).get("labels") or {})


class State:
    def __init__(self, args):
        self.lock = threading.Condition()
        self.rv = FIRST_RV
        self.objects: dict[tuple[str, str], dict] = {}
        self.history: list[tuple[int, str, str, dict]] = []   # (rv, ns, type, object)
        self.compacted = 0          # watches from an RV below this are too old
        self.expired_form = "status"
        self.max_history = args.history
        self.tokens: set[str] = set(args.token or [])
        self.admin = args.admin_token
        self.forbidden: set[str] = set()
        self.auth = bool(self.tokens or self.admin)
        self.watches: list[Watch] = []
        self.faults: list[Fault] = []
        self.next_fault = 1
        self.fault_epoch = 0        # moves when faults are cleared (releases hangs)
        self.stopping = False
        self.stats_lock = threading.Lock()
        self.reset_stats()
        self.connections_open = 0

    # -- statistics ----------------------------------------------------------

    def reset_stats(self):
        with self.stats_lock:
            self.counts = {k: 0 for k in ("LIST", "WATCH", "GET", "POST", "PUT", "DELETE")}
            self.requests_total = 0
            self.watches_total = 0
            self.watch_starts: list[str] = []
            self.watch_log: list[dict] = []
            self.token_counts: dict[str, int] = {}
            self.last_token = ""
            self.unauthorized = 0
            self.forbidden_count = 0
            self.expired_status = 0
            self.expired_event = 0
            self.connections_total = 0

    def count(self, what: str, **kw):
        with self.stats_lock:
            if what in self.counts:
                self.counts[what] += 1
                self.requests_total += 1
            if what == "WATCH":
                self.watches_total += 1
                self.watch_starts = (self.watch_starts + [kw.get("rv", "")])[-50:]
                self.watch_log = (self.watch_log + [{"labelSelector": kw.get("selector", ""),
                                                     "resourceVersion": kw.get("rv", ""),
                                                     "token": kw.get("bearer")}])[-50:]
            if "token" in kw and kw["token"] is not None:
                self.token_counts[kw["token"]] = self.token_counts.get(kw["token"], 0) + 1
                self.last_token = kw["token"]
            for k in ("unauthorized", "expired_status", "expired_event", "connections_total"):
                if what == k:
                    setattr(self, k, getattr(self, k) + 1)
            if what == "forbidden":
                self.forbidden_count += 1

    def stats(self) -> dict:
        with self.lock:
            open_watches = len(self.watches)
            rv, compacted = self.rv, self.compacted
        with self.stats_lock:
            return {"requests": dict(self.counts), "requests_total": self.requests_total,
                    "watches_open": open_watches, "watches_total": self.watches_total,
                    "watch_starts": list(self.watch_starts), "watch_log": list(self.watch_log),
                    "tokens": dict(self.token_counts),
                    "last_token": self.last_token, "unauthorized": self.unauthorized,
                    "forbidden": self.forbidden_count, "expired_status": self.expired_status,
                    "expired_event": self.expired_event, "resource_version": str(rv),
                    "compacted": str(compacted), "connections_open": self.connections_open,
                    "connections_total": self.connections_total}

    # -- objects and events -------------------------------------------------

    def _emit(self, ns: str, etype: str, obj: dict) -> None:
        """Records an event (lock held) and queues it for matching watches."""
        rv = int(obj["metadata"]["resourceVersion"])
        self.history.append((rv, ns, etype, obj))
        while len(self.history) > self.max_history:
            old = self.history.pop(0)
            self.compacted = max(self.compacted, old[0])
        for w in self.watches:
            if w.matches(ns, obj):
                w.queue.append({"type": etype, "object": obj})
        self.lock.notify_all()

    def _stamp(self, ns: str, obj: dict, create: bool) -> dict:
        self.rv += 1
        obj = json.loads(json.dumps(obj))
        obj["kind"] = "EndpointSlice"
        obj["apiVersion"] = API_VERSION
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = ns
        meta["resourceVersion"] = str(self.rv)
        if create or "uid" not in meta:
            meta["uid"] = "%08x-0000-4000-8000-%012x" % (random.getrandbits(32), self.rv)
            meta["creationTimestamp"] = now_iso()
        meta["generation"] = meta.get("generation", 0) + 1 if not create else 1
        return obj

    def create(self, ns: str, obj: dict) -> dict:
        with self.lock:
            meta = obj.setdefault("metadata", {})
            name = meta.get("name")
            if not name and meta.get("generateName"):
                name = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
                meta["name"] = name
            if not name or not isinstance(name, str):
                raise ApiError(422, "Invalid", "EndpointSlice.discovery.k8s.io \"\" is invalid: metadata.name: Required value: name or generateName is required")
            if (ns, name) in self.objects:
                raise ApiError(409, "AlreadyExists", f"endpointslices.discovery.k8s.io \"{name}\" already exists")
            stored = self._stamp(ns, obj, True)
            self.objects[(ns, name)] = stored
            self._emit(ns, "ADDED", stored)
            return stored

    def replace(self, ns: str, name: str, obj: dict) -> dict:
        with self.lock:
            have = self.objects.get((ns, name))
            if have is None:
                raise ApiError(404, "NotFound", f"endpointslices.discovery.k8s.io \"{name}\" not found")
            meta = obj.setdefault("metadata", {})
            if meta.get("name", name) != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            want = meta.get("resourceVersion")
            if want and want != have["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f"Operation cannot be fulfilled on endpointslices.discovery.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again")
            meta["name"] = name
            meta["uid"] = have["metadata"]["uid"]
            meta["creationTimestamp"] = have["metadata"].get("creationTimestamp")
            meta["generation"] = have["metadata"].get("generation", 1)
            stored = self._stamp(ns, obj, False)
            self.objects[(ns, name)] = stored
            self._emit(ns, "MODIFIED", stored)
            return stored

    def raw_put(self, ns: str, obj: dict) -> dict:
        """Stores without validation (bad data on purpose)."""
        with self.lock:
            meta = obj.setdefault("metadata", {}) if isinstance(obj, dict) else {}
            name = str(meta.get("name", "raw"))
            existed = (ns, name) in self.objects
            stored = self._stamp(ns, obj, not existed)
            stored["metadata"]["name"] = name
            self.objects[(ns, name)] = stored
            self._emit(ns, "MODIFIED" if existed else "ADDED", stored)
            return stored

    def delete(self, ns: str, name: str) -> dict:
        with self.lock:
            have = self.objects.pop((ns, name), None)
            if have is None:
                raise ApiError(404, "NotFound", f"endpointslices.discovery.k8s.io \"{name}\" not found")
            self.rv += 1
            gone = json.loads(json.dumps(have))
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._emit(ns, "DELETED", gone)
            return gone

    def delete_collection(self, ns: str, reqs) -> dict:
        """Deletes every matching slice at once (their events reach a watch together)."""
        with self.lock:
            out = self.list(ns, reqs)
            for item in out["items"]:
                self.delete(ns, item["metadata"]["name"])
            return out

    def get(self, ns: str, name: str) -> dict:
        with self.lock:
            have = self.objects.get((ns, name))
            if have is None:
                raise ApiError(404, "NotFound", f"endpointslices.discovery.k8s.io \"{name}\" not found")
            return have

    def list(self, ns: str, reqs) -> dict:
        with self.lock:
            items = []
            for (ons, _), obj in sorted(self.objects.items()):
                if ons == ns and selector_matches(reqs, obj["metadata"].get("labels") or {}):
                    item = dict(obj)
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                    items.append(item)
            return {"kind": "EndpointSliceList", "apiVersion": API_VERSION,
                    "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    def open_watch(self, ns: str, reqs, rv_text: str) -> tuple[Watch | None, str | None]:
        """Registers a watch; (None, form) when its resourceVersion is too old."""
        with self.lock:
            w = Watch(ns, reqs)
            if rv_text in ("", "0"):
                for (ons, _), obj in sorted(self.objects.items()):
                    if w.matches(ons, obj):
                        w.queue.append({"type": "ADDED", "object": obj})
            else:
                try:
                    rv = int(rv_text)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resource version: {rv_text!r}")
                if rv < self.compacted:
                    return None, self.expired_form
                for erv, ens, etype, obj in self.history:
                    if erv > rv and w.matches(ens, obj):
                        w.queue.append({"type": etype, "object": obj})
            self.watches.append(w)
            return w, None

    def close_watch(self, w: Watch) -> None:
        with self.lock:
            if w in self.watches:
                self.watches.remove(w)

    def compact(self, form: str, expire_open: bool) -> None:
        with self.lock:
            self.compacted = self.rv
            self.history.clear()
            self.expired_form = form
            if expire_open:
                for w in self.watches:
                    w.end = "expire"
            self.lock.notify_all()

    def end_watches(self, how: str) -> int:
        with self.lock:
            for w in self.watches:
                w.end = how
            self.lock.notify_all()
            return len(self.watches)

    # -- faults ----------------------------------------------------------------

    def add_fault(self, spec: dict) -> Fault:
        mode = spec.get("mode")
        if mode not in FAULT_MODES:
            raise ApiError(400, "BadRequest", f"unknown fault mode {mode!r}; accepted: {', '.join(FAULT_MODES)}")
        verb = spec.get("verb", "any")
        if verb not in ("any", "list", "watch", "get"):
            raise ApiError(400, "BadRequest", "verb must be any, list, watch or get")
        rest = {k: v for k, v in spec.items() if k not in ("mode", "verb", "count")}
        with self.lock:
            f = Fault(self.next_fault, mode, verb, int(spec.get("count", -1)), rest)
            self.next_fault += 1
            self.faults.append(f)
            return f

    def take_fault(self, verb: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.verb in ("any", verb):
                    if f.count > 0:
                        f.count -= 1
                        if f.count == 0:
                            self.faults.remove(f)
                    return f
            return None

    def clear_faults(self, fid=None) -> int:
        with self.lock:
            before = len(self.faults)
            self.faults = [f for f in self.faults if fid is not None and f.id != fid]
            self.fault_epoch += 1
            self.lock.notify_all()
            return before - len(self.faults)


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "k8s-emulator"
    sys_version = ""

    # set per server
    state: State = None          # type: ignore[assignment]
    backdoor = False
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    def setup(self):
        super().setup()
        if not self.backdoor:
            self.state.count("connections_total")
            with self.state.stats_lock:
                self.state.connections_open += 1

    def finish(self):
        try:
            super().finish()
        finally:
            if not self.backdoor:
                with self.state.stats_lock:
                    self.state.connections_open -= 1

    # -- responses -------------------------------------------------------------

    def send_json(self, code: int, obj, headers: dict | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_text(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > 4 * 1024 * 1024:
            raise ApiError(413, "RequestEntityTooLarge", "request entity too large")
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"invalid JSON body: {e}")

    def drop(self) -> None:
        """Closes the connection without an answer."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def client_gone(self) -> bool:
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            if isinstance(self.connection, ssl.SSLSocket):
                return self.connection.recv(1) == b""
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError, ssl.SSLError):
            return True

    # -- dispatch ----------------------------------------------------------------

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            if url.path.startswith("/_emu/"):
                return self.control(method, url.path[len("/_emu/"):])
            if url.path in ("/healthz", "/readyz", "/livez"):
                return self.send_text(200, "ok")
            if url.path == "/version":
                return self.send_json(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-emulator",
                                            "platform": "linux/amd64"})
            m = SLICES_RE.match(url.path)
            if not m:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            ns, name = m.group(1), m.group(2)
            if not DNS_LABEL.match(ns):
                raise ApiError(400, "BadRequest", f"invalid namespace {ns!r}")
            watching = method == "GET" and name is None and q.get("watch") in ("1", "true")
            verb = {"GET": "watch" if watching else ("get" if name else "list")}.get(method, method.lower())
            self.authenticate(verb, ns)
            if not self.backdoor:
                if self.apply_fault(verb, ns, q):
                    return
            if method == "GET" and name is None and watching:
                return self.watch(ns, q)
            if method == "GET" and name is None:
                self.count("LIST")
                return self.send_json(200, self.state.list(ns, parse_selector(q.get("labelSelector", ""))))
            if method == "GET":
                self.count("GET")
                return self.send_json(200, self.state.get(ns, name))
            if method == "POST" and name is None:
                self.count("POST")
                obj = self.read_body()
                validate_slice(obj, (obj.get("metadata") or {}).get("name") if isinstance(obj, dict) else None)
                return self.send_json(201, self.state.create(ns, obj))
            if method == "PUT" and name:
                self.count("PUT")
                obj = self.read_body()
                validate_slice(obj, name)
                return self.send_json(200, self.state.replace(ns, name, obj))
            if method == "DELETE" and name is None:
                self.count("DELETE")
                return self.send_json(200, self.state.delete_collection(ns, parse_selector(q.get("labelSelector", ""))))
            if method == "DELETE" and name:
                self.count("DELETE")
                gone = self.state.delete(ns, name)
                return self.send_json(200, status_obj(200, "", "", {
                    "name": name, "group": "discovery.k8s.io", "kind": "endpointslices",
                    "uid": gone["metadata"].get("uid")}))
            raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource")
        except ApiError as e:
            self.send_json(e.code, e.status())
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True

    def count(self, what: str, **kw) -> None:
        if not self.backdoor:
            self.state.count(what, **kw)

    bearer = None

    def authenticate(self, verb: str, ns: str) -> None:
        st = self.state
        if self.backdoor or not st.auth:
            return
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        self.bearer = token
        with st.lock:
            ok = token is not None and (token in st.tokens or token == st.admin)
            forbidden = token in st.forbidden
        if not ok:
            self.count("unauthorized")
            raise ApiError(401, "Unauthorized", "Unauthorized")
        self.count("token", token=token)
        if forbidden:
            self.count("forbidden")
            raise ApiError(403, "Forbidden", f"endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:{ns}:upsync\" cannot {verb} resource \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \"{ns}\"")

    # -- faults ------------------------------------------------------------------

    def apply_fault(self, verb: str, ns: str, q: dict) -> bool:
        """Applies a matching fault; True when the request is answered (or dropped)."""
        f = self.state.take_fault(verb)
        if f is None:
            return False
        s = f.spec
        if f.mode == "delay":
            time.sleep(float(s.get("delay_ms", 1000)) / 1000)
            return False
        if f.mode == "status":
            code = int(s.get("status", 500))
            if "body" in s:
                body = s["body"].encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_json(code, status_obj(code, "InternalError" if code >= 500 else "BadRequest",
                                                s.get("message", "injected fault")))
            return True
        if f.mode == "close":
            self.drop()
            return True
        if f.mode == "hang":
            epoch = self.state.fault_epoch
            with self.state.lock:
                while self.state.fault_epoch == epoch and not self.state.stopping:
                    self.state.lock.wait(POLL)
                    if self.client_gone():
                        break
            self.drop()
            return True
        if f.mode == "malformed":
            if verb == "watch":
                self.count("WATCH", rv=q.get("resourceVersion", ""), selector=q.get("labelSelector", ""), bearer=self.bearer)
                self.start_chunked()
                self.chunk(b'{"type":"ADDED","object":{"metadata":\n')
                self.end_chunked()
            else:
                body = b'{"kind":"EndpointSliceList","items":[{"metadata":'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            return True
        if f.mode == "close_mid_stream":
            if verb == "watch":
                self.watch(ns, q, abort_after=int(s.get("after_events", 0)))
            else:
                body = json.dumps(self.state.list(ns, parse_selector(q.get("labelSelector", "")))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.drop()
            return True
        if f.mode == "end_stream" and verb == "watch":
            self.watch(ns, q, end_after=float(s.get("after_ms", 0)) / 1000)
            return True
        if f.mode == "gone" and verb == "watch":
            self.count("WATCH", rv=q.get("resourceVersion", ""), selector=q.get("labelSelector", ""), bearer=self.bearer)
            self.too_old(q.get("resourceVersion", ""), s.get("form", "status"))
            return True
        return False

    # -- watch -------------------------------------------------------------------

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def too_old(self, rv: str, form: str) -> None:
        with self.state.lock:
            current = self.state.rv
        msg = f"too old resource version: {rv} ({current})"
        if form == "event":
            self.count("expired_event")
            self.start_chunked()
            self.chunk(json.dumps({"type": "ERROR", "object": status_obj(410, "Expired", msg)}).encode() + b"\n")
            self.end_chunked()
        else:
            self.count("expired_status")
            self.send_json(410, status_obj(410, "Expired", msg))

    def watch(self, ns: str, q: dict, abort_after: int | None = None, end_after: float | None = None) -> None:
        st = self.state
        rv = q.get("resourceVersion", "")
        self.count("WATCH", rv=rv, selector=q.get("labelSelector", ""), bearer=self.bearer)
        reqs = parse_selector(q.get("labelSelector", ""))
        try:
            timeout = float(q.get("timeoutSeconds") or st.default_watch_timeout)
        except ValueError:
            raise ApiError(400, "BadRequest", "invalid timeoutSeconds")
        bookmarks = q.get("allowWatchBookmarks") in ("1", "true")
        w, expired = st.open_watch(ns, reqs, rv)
        if w is None:
            self.too_old(rv, expired)
            return
        try:
            self.start_chunked()
            started = time.monotonic()
            deadline = started + timeout
            if end_after is not None:
                deadline = min(deadline, started + end_after)
            next_bookmark = started + st.bookmark_interval
            sent = 0
            while True:
                with st.lock:
                    while not w.queue and w.end is None and not st.stopping:
                        now = time.monotonic()
                        if now >= deadline or (bookmarks and now >= next_bookmark):
                            break
                        st.lock.wait(min(POLL, max(0.0, min(deadline, next_bookmark) - now)))
                        if self.client_gone():
                            raise ClientGone()
                    events, w.queue = w.queue, []
                    end = w.end
                    current = st.rv
                # the events of one wake-up leave in one write, as one burst
                out = b""
                for ev in events:
                    if abort_after is not None and sent >= abort_after:
                        break
                    data = json.dumps(ev, separators=(",", ":")).encode() + b"\n"
                    out += b"%x\r\n%s\r\n" % (len(data), data)
                    sent += 1
                if out:
                    self.wfile.write(out)
                    self.wfile.flush()
                if abort_after is not None and sent >= abort_after:
                    self.drop()
                    return
                if end == "abort":
                    self.drop()
                    return
                if end == "expire":
                    self.count("expired_event")
                    msg = "The resourceVersion for the provided watch is too old."
                    self.chunk(json.dumps({"type": "ERROR", "object": status_obj(410, "Expired", msg)}).encode() + b"\n")
                    self.end_chunked()
                    return
                if end == "clean" or st.stopping:
                    self.end_chunked()
                    return
                now = time.monotonic()
                if bookmarks and now >= next_bookmark:
                    self.chunk(json.dumps({"type": "BOOKMARK", "object": {
                        "kind": "EndpointSlice", "apiVersion": API_VERSION,
                        "metadata": {"resourceVersion": str(current), "creationTimestamp": None},
                        "addressType": "", "endpoints": None}}, separators=(",", ":")).encode() + b"\n")
                    next_bookmark = now + st.bookmark_interval
                if now >= deadline:
                    self.end_chunked()
                    return
        finally:
            st.close_watch(w)

    # -- control -----------------------------------------------------------------

    def control(self, method: str, what: str) -> None:
        st = self.state
        if method == "GET" and what == "stats":
            return self.send_json(200, st.stats())
        if method == "GET" and what == "faults":
            with st.lock:
                return self.send_json(200, [f.to_json() for f in st.faults])
        if method not in ("POST", "PUT"):
            raise ApiError(405, "MethodNotAllowed", "control requests are POST or PUT")
        body = self.read_body()
        if what == "reset_stats":
            st.reset_stats()
            return self.send_json(200, {})
        if what == "tokens":
            with st.lock:
                st.tokens = set(body.get("tokens") or [])
                st.forbidden = set(body.get("forbidden") or [])
                st.auth = bool(st.tokens or st.admin)
            return self.send_json(200, {})
        if what == "compact":
            form = body.get("form", "status")
            if form not in ("status", "event"):
                raise ApiError(400, "BadRequest", "form must be status or event")
            st.compact(form, body.get("open_watches", "keep") == "expire")
            return self.send_json(200, {"compacted": str(st.compacted)})
        if what == "end_watches":
            how = body.get("how", "clean")
            if how not in ("clean", "abort"):
                raise ApiError(400, "BadRequest", "how must be clean or abort")
            return self.send_json(200, {"ended": st.end_watches(how)})
        if what == "raw_put":
            return self.send_json(200, st.raw_put(body.get("namespace", "default"), body.get("object")))
        if what == "fault":
            return self.send_json(200, {"id": st.add_fault(body).id})
        if what == "clear_faults":
            return self.send_json(200, {"cleared": st.clear_faults(body.get("id"))})
        raise ApiError(404, "NotFound", f"unknown control request {what!r}")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, tls: ssl.SSLContext | None):
        self.tls = tls
        super().__init__(addr, handler)

    def finish_request(self, request, client_address):
        conn = request
        if self.tls is not None:
            request.settimeout(10)
            try:
                conn = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                try:
                    request.close()
                except OSError:
                    pass
                return
            conn.settimeout(None)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            if conn is not request:
                try:
                    conn.close()
                except OSError:
                    pass

    def handle_error(self, request, client_address):
        pass   # a client that went away is not an error worth a traceback


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--control-listen")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--tls-client-ca")
    ap.add_argument("--token", action="append")
    ap.add_argument("--admin-token")
    ap.add_argument("--bookmark-interval", type=float, default=60.0)
    ap.add_argument("--default-watch-timeout", type=float, default=1800.0)
    ap.add_argument("--history", type=int, default=10000)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    state = State(args)
    state.bookmark_interval = max(0.05, args.bookmark_interval)
    state.default_watch_timeout = args.default_watch_timeout

    tls = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            tls.load_verify_locations(args.tls_client_ca)
            tls.verify_mode = ssl.CERT_REQUIRED

    def handler(backdoor: bool):
        return type("H", (Handler,), {"state": state, "backdoor": backdoor, "verbose": args.verbose})

    main_srv = Server(host_port(args.listen), handler(False), tls)
    servers = [main_srv]
    print(f"k8s-emulator listening on 127.0.0.1:{main_srv.server_address[1]}", flush=True)
    if args.control_listen:
        ctl = Server(host_port(args.control_listen), handler(True), None)
        servers.append(ctl)
        print(f"k8s-emulator control on 127.0.0.1:{ctl.server_address[1]}", flush=True)

    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
               for s in servers]
    for t in threads:
        t.start()
    done = threading.Event()

    def stop(_sig, _frm):
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    done.wait()
    with state.lock:
        state.stopping = True
        state.lock.notify_all()
    for s in servers:
        s.shutdown()
        s.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
