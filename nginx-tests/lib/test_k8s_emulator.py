"""Self-test for k8s_emulator.py (stdlib unittest only).

Run from the repository root:
    python3 -m unittest discover -s nginx-tests/lib -p 'test_*.py'

Each test starts its own emulator subprocess on 127.0.0.1:0 and stops it (by the
PID it started) in tearDown.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True       # keep nginx-tests/lib free of __pycache__
EMULATOR = os.path.join(HERE, "k8s_emulator.py")
HOST = "127.0.0.1"
NS = "prod"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
SELECTOR = "labelSelector=kubernetes.io%2Fservice-name%3Dweb"


def read_line(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """One line of the emulator's stdout (unbuffered: a line never waits in a buffer)."""
    out = b""
    end = time.monotonic() + timeout
    while not out.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise RuntimeError("emulator did not print its listening line")
        c = os.read(proc.stdout.fileno(), 1)
        if not c:
            raise RuntimeError("emulator exited before listening")
        out += c
    return out.decode().strip()


def slice_obj(name: str, port: int, endpoints, service: str = "web", family: str = "IPv4") -> dict:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": r, "serving": r, "terminating": False}}
                      for a, r in endpoints],
    }


class Stream:
    """A raw watch client: sends one GET, then decodes the chunked body as it comes."""

    def __init__(self, port: int, path: str, headers: dict | None = None, tls: ssl.SSLContext | None = None):
        s = socket.create_connection((HOST, port), timeout=5)
        self.sock = tls.wrap_socket(s, server_hostname="127.0.0.1") if tls else s
        hdrs = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: k8s\r\n{hdrs}\r\n".encode())
        self.buf = b""
        self.body = b""
        self.ended = False      # the last chunk arrived
        self.closed = False     # the connection closed
        head = self._until(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}

    def _fill(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLError, ConnectionResetError):
            return False
        if not data:
            self.closed = True
            return False
        self.buf += data
        return True

    def _until(self, sep: bytes, timeout: float = 5.0) -> bytes:
        end = time.monotonic() + timeout
        while sep not in self.buf:
            if time.monotonic() > end or self.closed:
                raise AssertionError(f"no {sep!r} in {self.buf!r}")
            self._fill(0.2)
        out, self.buf = self.buf.split(sep, 1)
        return out

    def fixed_body(self) -> bytes:
        n = int(self.headers.get("content-length", "0"))
        end = time.monotonic() + 5
        while len(self.buf) < n and time.monotonic() < end and not self.closed:
            self._fill(0.2)
        return self.buf[:n]

    def events(self, n: int = 1, timeout: float = 5.0) -> list[dict]:
        """Waits for n more complete events (or the end of the stream)."""
        out = []
        end = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < end and not self.ended and not self.closed:
            # decode every complete chunk in the buffer
            while b"\r\n" in self.buf:
                size_line, rest = self.buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                if size == 0:
                    self.ended = True
                    break
                if len(rest) < size + 2:
                    break
                self.body += rest[:size]
                self.buf = rest[size + 2:]
            while b"\n" in self.body:
                line, self.body = self.body.split(b"\n", 1)
                out.append(json.loads(line))
            if len(out) < n and not self.ended:
                self._fill(0.1)
        return out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class EmulatorCase(unittest.TestCase):
    ARGS: tuple = ("--bookmark-interval", "0.3")

    def setUp(self):
        self.proc = subprocess.Popen(
            [sys.executable, EMULATOR, "--listen", f"{HOST}:0", "--control-listen", f"{HOST}:0", *self.ARGS],
            stdout=subprocess.PIPE, bufsize=0)
        self.addCleanup(self.stop)
        line = read_line(self.proc)
        self.assertTrue(line.startswith(f"k8s-emulator listening on {HOST}:"), line)
        self.port = int(line.rsplit(":", 1)[1])
        self.ctl = int(read_line(self.proc).rsplit(":", 1)[1])
        self.streams: list[Stream] = []

    def stop(self):
        for s in self.streams:
            s.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.assertEqual(self.proc.wait(5), 0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()

    def call(self, method, path, body=None, headers=None, port=None, tls=None):
        if tls:
            conn = http.client.HTTPSConnection(HOST, port or self.port, timeout=5, context=tls)
        else:
            conn = http.client.HTTPConnection(HOST, port or self.port, timeout=5)
        try:
            data = json.dumps(body) if body is not None else None
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:
                return resp.status, raw
        finally:
            conn.close()

    def admin(self, method, path, body=None):
        """Through the control listener: no faults, no auth, not counted."""
        return self.call(method, path, body, port=self.ctl)

    def control(self, what, body=None):
        status, out = self.call("POST", f"/_emu/{what}", body or {})
        self.assertEqual(status, 200, out)
        return out

    def stats(self):
        return self.call("GET", "/_emu/stats")[1]

    def watch(self, rv: str, extra: str = "", headers=None, tls=None) -> Stream:
        s = Stream(self.port, f"{SLICES}?{SELECTOR}&watch=1&resourceVersion={rv}{extra}", headers, tls)
        self.streams.append(s)
        return s

    def list_rv(self) -> str:
        status, out = self.call("GET", f"{SLICES}?{SELECTOR}")
        self.assertEqual(status, 200)
        return out["metadata"]["resourceVersion"]


class TestObjects(EmulatorCase):
    def test_crud_list_and_selector(self):
        self.assertEqual(self.call("GET", "/healthz")[0], 200)
        status, out = self.call("GET", f"{SLICES}?{SELECTOR}")
        self.assertEqual((status, out["kind"], out["items"]), (200, "EndpointSliceList", []))
        rv0 = int(out["metadata"]["resourceVersion"])
        status, a = self.call("POST", SLICES, slice_obj("web-a", 8080, [("10.0.0.1", True)]))
        self.assertEqual(status, 201, a)
        self.assertEqual(int(a["metadata"]["resourceVersion"]), rv0 + 1)
        self.assertEqual((a["kind"], a["metadata"]["namespace"]), ("EndpointSlice", NS))
        self.call("POST", SLICES, slice_obj("db-a", 5432, [("10.0.0.9", True)], service="db"))
        gen = slice_obj("", 80, [])
        gen["metadata"] = {"generateName": "web-", "labels": {"kubernetes.io/service-name": "web"}}
        status, g = self.call("POST", SLICES, gen)
        self.assertEqual(status, 201)
        self.assertRegex(g["metadata"]["name"], r"^web-[a-z0-9]{5}$")
        status, out = self.call("GET", f"{SLICES}?{SELECTOR}")
        names = sorted(i["metadata"]["name"] for i in out["items"])
        self.assertEqual(names, sorted(["web-a", g["metadata"]["name"]]))
        self.assertNotIn("kind", out["items"][0], "list items carry no kind")
        self.assertEqual(int(out["metadata"]["resourceVersion"]), rv0 + 3)
        # other selector forms
        _, out = self.call("GET", f"{SLICES}?labelSelector=kubernetes.io%2Fservice-name%21%3Dweb")
        self.assertEqual([i["metadata"]["name"] for i in out["items"]], ["db-a"])
        self.assertEqual(self.call("GET", f"{SLICES}?labelSelector=x+in+(a)")[0], 400)
        # replace: stale resourceVersion -> 409, current -> 200; get; delete; 404
        stale = slice_obj("web-a", 8080, [("10.0.0.2", True)])
        stale["metadata"]["resourceVersion"] = str(rv0)
        self.assertEqual(self.call("PUT", f"{SLICES}/web-a", stale)[0], 409)
        stale["metadata"]["resourceVersion"] = a["metadata"]["resourceVersion"]
        status, b = self.call("PUT", f"{SLICES}/web-a", stale)
        self.assertEqual((status, b["metadata"]["uid"]), (200, a["metadata"]["uid"]))
        self.assertEqual(self.call("GET", f"{SLICES}/web-a")[1]["endpoints"][0]["addresses"], ["10.0.0.2"])
        self.assertEqual(self.call("POST", SLICES, slice_obj("web-a", 1, []))[0], 409)
        # delete collection: every selected slice, their events in one burst
        w = self.watch(self.list_rv(), "&timeoutSeconds=10")
        self.call("POST", SLICES, slice_obj("web-b", 8080, [("10.0.0.3", True)]))
        self.assertEqual(w.events(1)[0]["type"], "ADDED")
        status, out = self.call("DELETE", f"{SLICES}?{SELECTOR}")
        self.assertEqual(status, 200)
        self.assertEqual(sorted(i["metadata"]["name"] for i in out["items"]),
                         sorted(["web-a", "web-b", g["metadata"]["name"]]))
        self.assertEqual([e["type"] for e in w.events(3)], ["DELETED"] * 3)
        self.call("POST", SLICES, slice_obj("web-a", 8080, [("10.0.0.2", True)]))
        status, out = self.call("DELETE", f"{SLICES}/web-a")
        self.assertEqual((status, out["status"]), (200, "Success"))
        self.assertEqual(self.call("DELETE", f"{SLICES}/web-a")[0], 404)
        self.assertEqual(self.call("PUT", f"{SLICES}/nope", slice_obj("nope", 1, []))[0], 404)
        self.assertEqual(self.call("GET", "/api/v1/namespaces/prod/pods")[0], 404)

    def test_validation(self):
        bad = [
            slice_obj("v1", 80, [("300.0.0.1", True)]),
            slice_obj("v2", 80, [("fd00::1", True)]),
            slice_obj("v3", 0, [("10.0.0.1", True)]),
            {**slice_obj("v4", 80, []), "addressType": "IPv5"},
            {**slice_obj("v5", 80, []), "endpoints": [{"addresses": []}]},
            {**slice_obj("v6", 80, []), "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]},
        ]
        for obj in bad:
            status, out = self.call("POST", SLICES, obj)
            self.assertEqual((status, out["reason"]), (422, "Invalid"), obj)
        # raw_put stores anything (bad data for readers)
        self.control("raw_put", {"namespace": NS, "object": bad[0]})
        self.assertEqual(self.call("GET", f"{SLICES}/v1")[1]["endpoints"][0]["addresses"], ["300.0.0.1"])


class TestWatch(EmulatorCase):
    def test_events_stream_as_they_happen(self):
        rv = self.list_rv()
        w = self.watch(rv, "&allowWatchBookmarks=true&timeoutSeconds=30")
        self.assertEqual((w.status, w.headers["transfer-encoding"]), (200, "chunked"))
        self.admin("POST", SLICES, slice_obj("web-a", 8080, [("10.0.0.1", False)]))
        ev = w.events(1)
        self.assertEqual([e["type"] for e in ev], ["ADDED"])
        self.assertEqual((ev[0]["object"]["kind"], ev[0]["object"]["apiVersion"]),
                         ("EndpointSlice", "discovery.k8s.io/v1"))
        self.admin("PUT", f"{SLICES}/web-a", slice_obj("web-a", 8080, [("10.0.0.1", True)]))
        ev = w.events(1)
        self.assertEqual(ev[0]["type"], "MODIFIED")
        self.assertTrue(ev[0]["object"]["endpoints"][0]["conditions"]["ready"])
        self.admin("POST", SLICES, slice_obj("db-a", 1, [("10.0.0.5", True)], service="db"))
        self.admin("DELETE", f"{SLICES}/web-a")
        ev = w.events(1)
        self.assertEqual(ev[0]["type"], "DELETED", "the db slice is filtered out")
        deleted_rv = int(ev[0]["object"]["metadata"]["resourceVersion"])
        # bookmarks carry the current version in an empty slice
        bm = w.events(1)[0]
        self.assertEqual(bm["type"], "BOOKMARK")
        self.assertEqual(bm["object"]["endpoints"], None)
        self.assertGreaterEqual(int(bm["object"]["metadata"]["resourceVersion"]), deleted_rv)
        st = self.stats()
        self.assertEqual((st["watches_open"], st["requests"]["WATCH"]), (1, 1))
        self.assertEqual(st["watch_starts"], [rv])

    def test_replay_initial_events_and_timeout(self):
        rv0 = self.list_rv()
        self.admin("POST", SLICES, slice_obj("web-a", 80, [("10.0.0.1", True)]))
        self.admin("POST", SLICES, slice_obj("web-b", 80, [("10.0.0.2", True)]))
        # from an older version: the events since, in order
        w = self.watch(rv0, "&timeoutSeconds=1")
        self.assertEqual([e["object"]["metadata"]["name"] for e in w.events(2)], ["web-a", "web-b"])
        # timeoutSeconds ends the watch cleanly (last chunk), no bookmark asked
        t0 = time.monotonic()
        self.assertEqual(w.events(1, timeout=3), [])
        self.assertTrue(w.ended)
        self.assertLess(time.monotonic() - t0, 2.5)
        # from 0: synthetic ADDED for what exists
        w = self.watch("0", "&timeoutSeconds=5")
        self.assertEqual([e["type"] for e in w.events(2)], ["ADDED", "ADDED"])

    def test_too_old_in_both_forms(self):
        rv0 = self.list_rv()
        self.admin("POST", SLICES, slice_obj("web-a", 80, [("10.0.0.1", True)]))
        self.assertEqual(self.control("compact")["compacted"], self.list_rv())
        w = self.watch(rv0)
        self.assertEqual(w.status, 410)
        body = json.loads(w.fixed_body())
        self.assertEqual((body["kind"], body["code"], body["reason"]), ("Status", 410, "Expired"))
        self.assertIn(f"too old resource version: {rv0}", body["message"])
        # the current version is still fine
        self.assertEqual(self.watch(self.list_rv(), "&timeoutSeconds=5").status, 200)
        self.control("compact", {"form": "event"})
        w = self.watch(rv0)
        self.assertEqual(w.status, 200)
        ev = w.events(1)
        self.assertEqual((ev[0]["type"], ev[0]["object"]["code"]), ("ERROR", 410))
        w.events(1, timeout=2)
        self.assertTrue(w.ended)
        # an open watch overtaken by a compaction gets the ERROR event
        w = self.watch(self.list_rv(), "&timeoutSeconds=30")
        self.control("compact", {"open_watches": "expire"})
        ev = w.events(1)
        self.assertEqual((ev[0]["type"], ev[0]["object"]["code"]), ("ERROR", 410))
        st = self.stats()
        # the event form once, and both watches open at the second compaction
        self.assertEqual((st["expired_status"], st["expired_event"]), (1, 3))

    def test_end_watches_clean_and_abort(self):
        w1 = self.watch(self.list_rv(), "&timeoutSeconds=30")
        self.assertEqual(self.control("end_watches")["ended"], 1)
        w1.events(1, timeout=2)
        self.assertTrue(w1.ended)
        w2 = self.watch(self.list_rv(), "&timeoutSeconds=30")
        self.control("end_watches", {"how": "abort"})
        w2.events(1, timeout=2)
        self.assertTrue(w2.closed and not w2.ended)


class TestAuth(EmulatorCase):
    ARGS = ("--token", "tok-1", "--admin-token", "admin", "--bookmark-interval", "0.3")

    def test_tokens_rotation_and_rbac(self):
        bearer = lambda t: {"Authorization": f"Bearer {t}"}
        self.assertEqual(self.call("GET", f"{SLICES}?{SELECTOR}")[1]["reason"], "Unauthorized")
        self.assertEqual(self.call("GET", f"{SLICES}?{SELECTOR}", headers=bearer("tok-1"))[0], 200)
        self.assertEqual(self.call("GET", "/version")[0], 200, "no token needed")
        w = self.watch("0", "&timeoutSeconds=30", headers=bearer("tok-1"))
        self.assertEqual(w.status, 200)
        # rotation: the old token is refused from now on, the open watch goes on
        self.control("tokens", {"tokens": ["tok-2"]})
        self.assertEqual(self.call("GET", f"{SLICES}?{SELECTOR}", headers=bearer("tok-1"))[0], 401)
        self.assertEqual(self.call("GET", f"{SLICES}?{SELECTOR}", headers=bearer("admin"))[0], 200)
        self.admin("POST", SLICES, slice_obj("web-a", 80, [("10.0.0.1", True)]))
        self.assertEqual(w.events(1)[0]["type"], "ADDED")
        self.assertEqual(self.call("GET", f"{SLICES}?{SELECTOR}", headers=bearer("tok-2"))[0], 200)
        st = self.stats()
        self.assertEqual((st["last_token"], st["tokens"]["tok-1"], st["unauthorized"]), ("tok-2", 2, 2))
        # forbidden: authenticated, but RBAC says no
        self.control("tokens", {"tokens": ["tok-2"], "forbidden": ["tok-2"]})
        status, out = self.call("GET", f"{SLICES}?{SELECTOR}", headers=bearer("tok-2"))
        self.assertEqual((status, out["reason"]), (403, "Forbidden"))
        self.assertIn('cannot list resource "endpointslices"', out["message"])


class TestFaults(EmulatorCase):
    def test_faults(self):
        self.admin("POST", SLICES, slice_obj("web-a", 80, [("10.0.0.1", True)]))
        self.control("fault", {"mode": "status", "status": 503, "verb": "list", "count": 1})
        self.assertEqual(self.call("GET", f"{SLICES}?{SELECTOR}")[0], 503)
        self.assertEqual(self.call("GET", f"{SLICES}?{SELECTOR}")[0], 200, "count ran out")
        self.control("fault", {"mode": "malformed", "verb": "list", "count": 1})
        status, raw = self.call("GET", f"{SLICES}?{SELECTOR}")
        self.assertEqual(status, 200)
        self.assertIsInstance(raw, bytes)
        self.control("fault", {"mode": "close", "count": 1})
        with self.assertRaises((http.client.RemoteDisconnected, ConnectionResetError)):
            self.call("GET", f"{SLICES}?{SELECTOR}")
        self.control("fault", {"mode": "delay", "delay_ms": 300, "count": 1})
        t0 = time.monotonic()
        self.assertEqual(self.call("GET", f"{SLICES}?{SELECTOR}")[0], 200)
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)
        # a watch cut after one event, without the last chunk
        self.control("fault", {"mode": "close_mid_stream", "verb": "watch", "after_events": 1, "count": 1})
        w = self.watch("0")
        self.assertEqual(len(w.events(1)), 1)
        w.events(1, timeout=2)
        self.assertTrue(w.closed and not w.ended)
        # a watch ended quietly after 200 ms
        self.control("fault", {"mode": "end_stream", "verb": "watch", "after_ms": 200, "count": 1})
        w = self.watch(self.list_rv())
        self.assertEqual(w.events(1, timeout=2), [])
        self.assertTrue(w.ended)
        # too old whatever the version, both forms
        self.control("fault", {"mode": "gone", "verb": "watch", "count": 1})
        self.assertEqual(self.watch(self.list_rv()).status, 410)
        self.control("fault", {"mode": "gone", "form": "event", "verb": "watch", "count": 1})
        self.assertEqual(self.watch(self.list_rv()).events(1)[0]["object"]["code"], 410)
        # malformed watch stream
        self.control("fault", {"mode": "malformed", "verb": "watch", "count": 1})
        w = self.watch(self.list_rv())
        with self.assertRaises(ValueError):
            w.events(1)
        # hang until cleared
        self.control("fault", {"mode": "hang", "verb": "list"})
        self.assertEqual(len(self.call("GET", "/_emu/faults")[1]), 1)
        s = socket.create_connection((HOST, self.port), timeout=5)
        s.sendall(f"GET {SLICES}?{SELECTOR} HTTP/1.1\r\nHost: k\r\n\r\n".encode())
        self.assertEqual(select.select([s], [], [], 0.3)[0], [], "no answer while hung")
        self.assertEqual(self.control("clear_faults")["cleared"], 1)
        s.settimeout(5)
        self.assertEqual(s.recv(100), b"", "released by closing")
        s.close()
        self.assertEqual(self.control("fault", {"mode": "nope"}) if False else
                         self.call("POST", "/_emu/fault", {"mode": "nope"})[0], 400)


@unittest.skipUnless(shutil.which("openssl"), "no openssl command")
class TestTls(unittest.TestCase):
    def test_https(self):
        d = tempfile.mkdtemp(prefix="k8s-emu-tls-")
        try:
            key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
            cmds = [
                f"openssl req -x509 {key} -keyout ca.key -out ca.pem -days 1 -subj /CN=ca "
                "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign",
                f"openssl req -new {key} -keyout s.key -out s.csr -subj /CN=s -addext subjectAltName=IP:127.0.0.1",
                "openssl x509 -req -in s.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -copy_extensions copy -out s.pem",
            ]
            for c in cmds:
                subprocess.run(c, shell=True, cwd=d, check=True, capture_output=True)
            proc = subprocess.Popen([sys.executable, EMULATOR, "--listen", f"{HOST}:0",
                                     "--tls-cert", f"{d}/s.pem", "--tls-key", f"{d}/s.key"],
                                    stdout=subprocess.PIPE, bufsize=0)
            try:
                port = int(read_line(proc).rsplit(":", 1)[1])
                ctx = ssl.create_default_context(cafile=f"{d}/ca.pem")
                # a plain-http client gets nothing useful, and does not block the server
                plain = socket.create_connection((HOST, port), timeout=5)
                plain.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
                conn = http.client.HTTPSConnection(HOST, port, timeout=5, context=ctx)
                conn.request("GET", f"{SLICES}?{SELECTOR}")
                r = conn.getresponse()
                self.assertEqual((r.status, json.loads(r.read())["kind"]), (200, "EndpointSliceList"))
                conn.close()
                plain.close()
                w = Stream(port, f"{SLICES}?{SELECTOR}&watch=1&resourceVersion=0&timeoutSeconds=1", tls=ctx)
                self.assertEqual(w.status, 200)
                w.events(1, timeout=3)
                self.assertTrue(w.ended)
                w.close()
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(5)
                proc.stdout.close()
        finally:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
