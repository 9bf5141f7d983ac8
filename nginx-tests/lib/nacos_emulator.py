#!/usr/bin/env python3
"""Nacos naming emulator for the ngx-stream-upsync test suite (stdlib only).

The real server in the suite is rnacos, which serves the v1 naming API only.  This
emulator serves the answer shapes rnacos does not: the 2.x open API
(``/nacos/v2/ns/instance/list`` -> ``{code, message, data: {hosts: [...]}}``) and the
3.x client API (``/nacos/v3/client/ns/instance/list`` -> ``{code, message, data:
[...]}``), written from Nacos's open-API documentation, plus the v1 shape, login with
token expiry, and fault injection.

Usage::

    python3 nacos_emulator.py --listen 127.0.0.1:0 [--apis v1,v2,v3]
        [--missing-status 404] [--auth USER:PASSWORD] [--token-ttl SECONDS]
        [--login-apis v1,v3]

Once ready it prints ``nacos-emulator listening on 127.0.0.1:PORT``.  SIGTERM or
SIGINT makes it exit with status 0.

Emulated
--------
* Instances: ``POST|PUT|DELETE /nacos/v1/ns/instance`` (query or form parameters
  serviceName, groupName, namespaceId, ip, port, weight, healthy, enabled, clusterName,
  metadata as a JSON string, ephemeral), ``PUT /nacos/v1/ns/health`` (healthy).
  Defaults as Nacos: namespace ``public``, group ``DEFAULT_GROUP``, cluster
  ``DEFAULT``, weight 1.0.  Instances never expire (no heartbeats needed).
* Instance lists, filtered by ``clusters`` (v1) / ``clusterName`` (v2, v3), comma
  separated, and by ``healthyOnly`` (default false, as Nacos documents):
  v1 ``{name, groupName, clusters, cacheMillis, hosts, lastRefTime, checksum, allIPs,
  reachProtectionThreshold, valid}``; v2 the same inside ``{code: 0, message:
  "success", data}``; v3 ``{code: 0, message: "success", data: [instances]}``.  A
  service that does not exist is an empty list in v1 and v2, and (assumed, the docs do
  not say) HTTP 404 ``{code: 21008, message: "service not exist"}`` in v3.
  APIs left out of ``--apis`` answer ``--missing-status`` (404 as every Nacos for an
  unknown path; 410 as Nacos 3.0/3.1 with the compatibility switch off) with a
  Spring-style JSON error page.
* Login, when ``--auth`` is given: ``POST /nacos/v1/auth/login`` answers
  ``{accessToken, tokenTtl, globalAdmin}``; ``POST /nacos/v3/auth/user/login`` the same
  inside ``{code: 0, message: "success", data}`` (``--login-apis`` picks which exist).
  Every other /nacos request needs ``accessToken`` (query, form, or header
  ``accessToken``); a missing one is 403 ``user not found!``, an unknown or expired
  one 403 ``token invalid!`` / ``token expired!``.  Wrong credentials: 403
  ``unknown user!``.

Not emulated: config APIs, gRPC, UDP push, clusters of servers, protect thresholds.

Test control API (never authenticated)
--------------------------------------
``GET /_emu/stats``: ``{"requests": {"GET /nacos/v1/ns/instance/list": n},
"healthy_only": [values sent], "logins": n, "refused": n, "access_tokens": [...]}``.
``POST /_emu/reset_stats``.  ``POST /_emu/expire_tokens``: every issued token expires
now.  ``POST /_emu/apis`` ``{"apis": ["v1"], "missing_status": 404}``: change what is
served.  ``POST /_emu/fault`` ``{"mode", "path_prefix": "", "count": -1, ...}``
(modes: ``status`` with ``status`` and ``body``; ``delay`` with ``delay_ms``; ``close``:
close without answering; ``body``: 200 with ``body``); ``POST /_emu/clear_faults``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LIST_PATHS = {
    "/nacos/v1/ns/instance/list": "v1",
    "/nacos/v2/ns/instance/list": "v2",
    "/nacos/v3/client/ns/instance/list": "v3",
}
LOGIN_PATHS = {"/nacos/v1/auth/login": "v1", "/nacos/v3/auth/user/login": "v3"}


def truthy(v, default):
    if v is None or v == "":
        return default
    return str(v).lower() in ("true", "1", "yes", "on")


class State:
    def __init__(self, args):
        self.lock = threading.Lock()
        self.apis = set(args.apis.split(","))
        self.missing_status = args.missing_status
        self.auth = args.auth.split(":", 1) if args.auth else None
        self.token_ttl = args.token_ttl
        self.login_apis = set(args.login_apis.split(","))
        self.services = {}   # (ns, group, name) -> {(ip, port, cluster): instance}
        self.tokens = {}     # token -> expiry (monotonic seconds)
        self.faults = []
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"requests": {}, "healthy_only": [], "logins": 0, "refused": 0,
                      "access_tokens": []}

    def key(self, p):
        return (p.get("namespaceId") or "public", p.get("groupName") or "DEFAULT_GROUP",
                p.get("serviceName", ""))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nacos-emulator"

    def log_message(self, *a):
        pass

    @property
    def st(self) -> State:
        return self.server.state

    # -- plumbing -------------------------------------------------------------------

    def send(self, status, body, ctype="application/json;charset=UTF-8"):
        data = body if isinstance(body, bytes) else (
            body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def params(self):
        url = urllib.parse.urlsplit(self.path)
        p = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        n = int(self.headers.get("Content-Length") or 0)
        self.raw_body = self.rfile.read(n) if n else b""
        if self.raw_body and "json" not in (self.headers.get("Content-Type") or ""):
            p.update(urllib.parse.parse_qsl(self.raw_body.decode("utf-8", "replace"),
                                            keep_blank_values=True))
        return url.path, p

    def spring_error(self, status, error, path):
        self.send(status, {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00"),
                           "status": status, "error": error, "path": path})

    def fault(self, path):
        with self.st.lock:
            for f in self.st.faults:
                if path.startswith(f.get("path_prefix", "")) and f.get("count", -1) != 0:
                    if f.get("count", -1) > 0:
                        f["count"] -= 1
                    return dict(f)
        return None

    def handle_any(self, method):
        path, p = self.params()
        if path.startswith("/_emu/"):
            return self.control(path)
        with self.st.lock:
            k = f"{method} {path}"
            self.st.stats["requests"][k] = self.st.stats["requests"].get(k, 0) + 1
        f = self.fault(path)
        if f:
            mode = f.get("mode")
            if mode == "delay":
                time.sleep(f.get("delay_ms", 1000) / 1000)
            elif mode == "close":
                self.close_connection = True
                return
            elif mode == "status":
                return self.send(f.get("status", 500), f.get("body", ""), "text/plain")
            elif mode == "body":
                return self.send(f.get("status", 200), f.get("body", ""))
        if path in LOGIN_PATHS:
            return self.login(path, p)
        if not self.authorized(p):
            return
        if path == "/nacos/v1/ns/instance":
            return self.instance(method, p)
        if path == "/nacos/v1/ns/health" and method == "PUT":
            return self.instance("HEALTH", p)
        if path in LIST_PATHS:
            api = LIST_PATHS[path]
            if api not in self.st.apis:
                status = self.st.missing_status
                return self.spring_error(status, "Not Found" if status == 404 else "Gone", path)
            if method != "GET":
                return self.spring_error(405, "Method Not Allowed", path)
            return self.list(api, p)
        return self.spring_error(404, "Not Found", path)

    do_GET = lambda self: self.handle_any("GET")       # noqa: E731
    do_POST = lambda self: self.handle_any("POST")     # noqa: E731
    do_PUT = lambda self: self.handle_any("PUT")       # noqa: E731
    do_DELETE = lambda self: self.handle_any("DELETE") # noqa: E731

    # -- auth -------------------------------------------------------------------------

    def login(self, path, p):
        st = self.st
        if LOGIN_PATHS[path] not in st.login_apis:
            return self.spring_error(404, "Not Found", path)
        if not st.auth or [p.get("username"), p.get("password")] != st.auth:
            with st.lock:
                st.stats["refused"] += 1
            return self.send(403, "unknown user!", "text/plain")
        token = secrets.token_hex(24)
        with st.lock:
            st.tokens[token] = time.monotonic() + st.token_ttl
            st.stats["logins"] += 1
        answer = {"accessToken": token, "tokenTtl": st.token_ttl, "globalAdmin": False,
                  "username": p.get("username")}
        if LOGIN_PATHS[path] == "v3":
            answer = {"code": 0, "message": "success", "data": answer}
        self.send(200, answer)

    def authorized(self, p):
        st = self.st
        if not st.auth:
            return True
        token = p.get("accessToken") or self.headers.get("accessToken") or ""
        with st.lock:
            st.stats["access_tokens"].append(token)
            expiry = st.tokens.get(token)
        if not token:
            why = "user not found!"
        elif expiry is None:
            why = "token invalid!"
        elif expiry < time.monotonic():
            why = "token expired!"
        else:
            return True
        with st.lock:
            st.stats["refused"] += 1
        self.send(403, why, "text/plain")
        return False

    # -- naming -----------------------------------------------------------------------

    def instance(self, method, p):
        st = self.st
        try:
            ip, port = p["ip"], int(p["port"])
        except (KeyError, ValueError):
            return self.send(400, "caused: Param 'ip' or 'port' is illegal", "text/plain")
        if not p.get("serviceName"):
            return self.send(400, "caused: Param 'serviceName' is required", "text/plain")
        cluster = p.get("clusterName") or "DEFAULT"
        with st.lock:
            svc = st.services.setdefault(st.key(p), {})
            ik = (ip, port, cluster)
            if method == "DELETE":
                svc.pop(ik, None)
                return self.send(200, "ok", "text/plain")
            cur = svc.get(ik)
            if method == "HEALTH":
                if cur is None:
                    return self.send(400, "instance not found", "text/plain")
                cur["healthy"] = truthy(p.get("healthy"), True)
                return self.send(200, "ok", "text/plain")
            inst = dict(cur) if cur and method == "PUT" else {
                "ip": ip, "port": port, "weight": 1.0, "healthy": True, "enabled": True,
                "ephemeral": truthy(p.get("ephemeral"), True), "clusterName": cluster,
                "metadata": {}}
            if "weight" in p:
                inst["weight"] = float(p["weight"])
            for f in ("healthy", "enabled"):
                if f in p:
                    inst[f] = truthy(p[f], True)
            if p.get("metadata"):
                try:
                    inst["metadata"] = json.loads(p["metadata"])
                except ValueError:
                    return self.send(400, "caused: metadata is not JSON", "text/plain")
            g, name = st.key(p)[1:]
            inst["serviceName"] = f"{g}@@{name}"
            inst["instanceId"] = f"{ip}#{port}#{cluster}#{g}@@{name}"
            svc[ik] = inst
        self.send(200, "ok", "text/plain")

    def list(self, api, p):
        st = self.st
        healthy_only = p.get("healthyOnly")
        clusters = p.get("clusters" if api == "v1" else "clusterName") or ""
        wanted = [c for c in clusters.split(",") if c]
        with st.lock:
            st.stats["healthy_only"].append(healthy_only)
            svc = st.services.get(st.key(p))
            hosts = [dict(i) for i in (svc or {}).values()
                     if (not wanted or i["clusterName"] in wanted)
                     and (not truthy(healthy_only, False) or i["healthy"])]
        hosts.sort(key=lambda i: (i["ip"], i["port"]))
        g, name = st.key(p)[1:]
        if api == "v3":
            if svc is None:
                return self.send(404, {"code": 21008, "message": "service not exist",
                                       "data": None})
            for h in hosts:
                h.pop("instanceId", None)
            return self.send(200, {"code": 0, "message": "success", "data": hosts})
        body = {"name": f"{g}@@{name}", "groupName": g, "clusters": clusters,
                "cacheMillis": 10000, "hosts": hosts,
                "lastRefTime": int(time.time() * 1000), "checksum": "",
                "allIPs": False, "reachProtectionThreshold": False, "valid": True}
        if api == "v2":
            body = {"code": 0, "message": "success", "data": body}
        self.send(200, body)

    # -- control ----------------------------------------------------------------------

    def control(self, path):
        st = self.st
        try:
            req = json.loads(self.raw_body or b"{}")
        except ValueError:
            return self.send(400, {"error": "body is not JSON"})
        with st.lock:
            if path == "/_emu/stats":
                return self.send(200, st.stats)
            if path == "/_emu/reset_stats":
                st.reset_stats()
            elif path == "/_emu/expire_tokens":
                for t in st.tokens:
                    st.tokens[t] = 0
            elif path == "/_emu/apis":
                st.apis = set(req.get("apis", ["v1", "v2", "v3"]))
                st.missing_status = int(req.get("missing_status", st.missing_status))
            elif path == "/_emu/fault":
                st.faults.append(req)
            elif path == "/_emu/clear_faults":
                st.faults.clear()
            else:
                return self.send(404, {"error": "unknown control path"})
        self.send(200, {})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--apis", default="v1,v2,v3")
    ap.add_argument("--missing-status", type=int, default=404)
    ap.add_argument("--auth", default="")
    ap.add_argument("--token-ttl", type=int, default=18000)
    ap.add_argument("--login-apis", default="v1,v3")
    args = ap.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost"):
        ap.error("only loopback addresses")
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    srv.daemon_threads = True
    srv.state = State(args)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=srv.shutdown).start())
    print(f"nacos-emulator listening on {host}:{srv.server_address[1]}", flush=True)
    srv.serve_forever()
    srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
