"""Self-test for consul_emulator.py (stdlib unittest only).

Run from the repository root:
    python3 -m unittest discover -s nginx-tests/lib -p 'test_*.py'

Each test starts its own emulator subprocess on 127.0.0.1:0 and kills it (by
the PID it started) in tearDown.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True       # keep nginx-tests/lib free of __pycache__
import consul_emulator  # noqa: E402

EMULATOR = os.path.join(HERE, "consul_emulator.py")
HOST = "127.0.0.1"


def read_port_line(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError("emulator did not print its listening line")
    line = proc.stdout.readline().strip()
    if not line:
        raise RuntimeError("emulator exited before listening")
    return line


class EmulatorCase(unittest.TestCase):
    ARGS: tuple = ()

    # -- process ----------------------------------------------------------------

    def setUp(self):
        self.proc = subprocess.Popen(
            [sys.executable, EMULATOR, "--listen", f"{HOST}:0", *self.ARGS],
            stdout=subprocess.PIPE, text=True)
        line = read_port_line(self.proc)
        self.assertTrue(line.startswith(f"consul-emulator listening on {HOST}:"), line)
        self.port = int(line.rsplit(":", 1)[1])
        self.control_port = self.port
        if "--control-listen" in self.ARGS:
            self.control_port = int(read_port_line(self.proc).rsplit(":", 1)[1])

    def tearDown(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()

    # -- HTTP helpers -------------------------------------------------------------

    def call(self, method, path, body=None, headers=None, timeout=5.0, port=None):
        conn = http.client.HTTPConnection(HOST, port or self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp, data
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def put(self, key, value=b"", query="", **kw):
        status, _, body = self.call("PUT", f"/v1/kv/{key}{query}", body=value, **kw)
        return status, body

    def index_of(self, resp) -> int:
        return int(resp.getheader("X-Consul-Index"))

    def control(self, name, obj=None, method="POST"):
        body = None if obj is None else json.dumps(obj).encode()
        status, _, data = self.call(method, f"/_emu/{name}", body=body, port=self.control_port)
        self.assertEqual(status, 200, data)
        return json.loads(data)

    def stats(self):
        return self.control("stats", method="GET")

    def wait_for(self, predicate, timeout=3.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        self.fail("condition not reached in time")

    def background(self, fn):
        result = {}

        def run():
            try:
                result["value"] = fn()
            except Exception as exc:   # noqa: BLE001 - reported by the test
                result["error"] = exc
            result["end"] = time.monotonic()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, result

    def register(self, definition):
        status, _, data = self.call("PUT", "/v1/agent/service/register",
                                    body=json.dumps(definition).encode())
        self.assertEqual(status, 200, data)


# ---------------------------------------------------------------------------

class DurationTest(unittest.TestCase):
    def test_go_durations(self):
        parse = consul_emulator.parse_go_duration
        self.assertEqual(parse("10s"), 10)
        self.assertEqual(parse("5m"), 300)
        self.assertAlmostEqual(parse("100ms"), 0.1)
        self.assertEqual(parse("1m30s"), 90)
        self.assertEqual(parse("1h"), 3600)
        self.assertAlmostEqual(parse("1.5s"), 1.5)
        self.assertEqual(parse("0"), 0)
        for bad in ("", "10", "s", "1x", "1m 30s"):
            with self.assertRaises(ValueError):
                parse(bad)


class KVTest(EmulatorCase):
    def test_put_get_base64_and_headers(self):
        self.assertEqual(self.put("upstreams/a/10.0.0.1:80", b"weight=2"), (200, b"true"))
        status, resp, body = self.get("/v1/kv/upstreams/a/10.0.0.1:80")
        self.assertEqual(status, 200)
        [entry] = json.loads(body)
        self.assertEqual(entry["Key"], "upstreams/a/10.0.0.1:80")
        self.assertEqual(base64.b64decode(entry["Value"]), b"weight=2")
        self.assertEqual(entry["Flags"], 0)
        self.assertEqual(entry["LockIndex"], 0)
        self.assertEqual(entry["CreateIndex"], entry["ModifyIndex"])
        self.assertEqual(self.index_of(resp), entry["ModifyIndex"])
        self.assertEqual(resp.getheader("X-Consul-KnownLeader"), "true")
        self.assertEqual(resp.getheader("X-Consul-LastContact"), "0")
        self.assertEqual(resp.getheader("Content-Type"), "application/json")
        status, _, raw = self.get("/v1/kv/upstreams/a/10.0.0.1:80?raw")
        self.assertEqual((status, raw), (200, b"weight=2"))

    def test_empty_value_and_folder_are_null(self):
        self.put("upstreams/a/", b"")
        self.put("upstreams/a/10.0.0.2:80", b"")
        _, _, body = self.get("/v1/kv/upstreams/a/?recurse")
        entries = json.loads(body)
        self.assertEqual([e["Key"] for e in entries], ["upstreams/a/", "upstreams/a/10.0.0.2:80"])
        self.assertTrue(all(e["Value"] is None for e in entries))

    def test_binary_value_roundtrip(self):
        value = bytes(range(256))
        self.put("bin", value)
        _, _, body = self.get("/v1/kv/bin")
        self.assertEqual(base64.b64decode(json.loads(body)[0]["Value"]), value)

    def test_missing_key_is_404_with_index(self):
        self.put("other", b"x")
        status, resp, body = self.get("/v1/kv/nope")
        self.assertEqual((status, body), (404, b""))
        self.assertGreaterEqual(self.index_of(resp), 1)
        status, resp, _ = self.get("/v1/kv/nothing/?recurse")
        self.assertEqual(status, 404)
        self.assertGreaterEqual(self.index_of(resp), 1)
        status, resp, _ = self.get("/v1/kv/nothing/?keys")
        self.assertEqual(status, 404)

    def test_prefix_semantics_and_sorting(self):
        for key in ("upstreams/test01/x", "upstreams/test/b", "upstreams/test/a", "upstreamsX"):
            self.put(key, b"1")
        _, _, body = self.get("/v1/kv/upstreams/test?recurse")
        self.assertEqual([e["Key"] for e in json.loads(body)],
                         ["upstreams/test/a", "upstreams/test/b", "upstreams/test01/x"])
        _, _, body = self.get("/v1/kv/upstreams/test/?recurse")
        self.assertEqual([e["Key"] for e in json.loads(body)],
                         ["upstreams/test/a", "upstreams/test/b"])
        _, _, body = self.get("/v1/kv/upstreams/?keys&separator=/")
        self.assertEqual(json.loads(body), ["upstreams/test/", "upstreams/test01/"])
        _, _, body = self.get("/v1/kv/upstreams/?keys")
        self.assertEqual(len(json.loads(body)), 3)

    def test_delete_and_recursive_delete_advance_index(self):
        self.put("p/a", b"1")
        self.put("p/b", b"2")
        self.put("q/c", b"3")
        _, resp, _ = self.get("/v1/kv/p/?recurse")
        before = self.index_of(resp)
        status, _, body = self.call("DELETE", "/v1/kv/p/b")
        self.assertEqual((status, body), (200, b"true"))
        _, resp, body = self.get("/v1/kv/p/?recurse")
        self.assertGreater(self.index_of(resp), before)      # tombstone index
        self.assertEqual([e["Key"] for e in json.loads(body)], ["p/a"])
        self.call("DELETE", "/v1/kv/p/?recurse")
        status, resp, _ = self.get("/v1/kv/p/?recurse")
        self.assertEqual(status, 404)
        self.assertGreater(self.index_of(resp), before + 1)
        self.assertEqual(self.get("/v1/kv/q/c")[0], 200)

    def test_cas_and_flags(self):
        self.assertEqual(self.put("k", b"1", "?cas=0"), (200, b"true"))
        self.assertEqual(self.put("k", b"2", "?cas=0"), (200, b"false"))
        _, _, body = self.get("/v1/kv/k")
        mod = json.loads(body)[0]["ModifyIndex"]
        self.assertEqual(self.put("k", b"3", f"?cas={mod + 100}"), (200, b"false"))
        self.assertEqual(self.put("k", b"3", f"?cas={mod}&flags=42"), (200, b"true"))
        [entry] = json.loads(self.get("/v1/kv/k")[2])
        self.assertEqual((entry["Flags"], base64.b64decode(entry["Value"])), (42, b"3"))
        self.assertGreater(entry["ModifyIndex"], entry["CreateIndex"])

    def test_index_is_monotonic_and_global(self):
        seen = []
        for i in range(5):
            self.put(f"m/{i}", b"x")
            seen.append(self.index_of(self.get(f"/v1/kv/m/{i}")[1]))
        self.assertEqual(seen, sorted(set(seen)))
        self.assertEqual(self.stats()["index"], seen[-1])

    def test_bad_requests(self):
        self.assertEqual(self.get("/v1/kv/")[0], 400)
        self.assertEqual(self.get("/v1/kv/x?index=1&wait=10")[0], 400)
        self.assertEqual(self.get("/v1/kv/x?index=abc")[0], 400)
        self.assertEqual(self.get("/v1/nope")[0], 404)

    def test_keepalive_many_requests_one_connection(self):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            for i in range(50):
                conn.request("PUT", f"/v1/kv/ka/{i}", body=b"v")
                resp = conn.getresponse()
                self.assertEqual(resp.read(), b"true")
                self.assertIsNotNone(resp.getheader("Content-Length"))
        finally:
            conn.close()
        stats = self.stats()
        self.assertEqual(stats["requests_total"], 50)
        self.assertEqual(stats["connections_total"], 1)


class MaxBodyTest(EmulatorCase):
    ARGS = ("--max-body", "10")

    def test_body_limit(self):
        self.assertEqual(self.put("k", b"0123456789")[0], 200)
        self.assertEqual(self.put("k", b"0123456789X")[0], 413)


class BlockingTest(EmulatorCase):
    def test_blocking_query_wakes_on_write(self):
        self.put("svc/a", b"1")
        idx = self.index_of(self.get("/v1/kv/svc/?recurse")[1])
        thread, result = self.background(
            lambda: self.get(f"/v1/kv/svc/?recurse&index={idx}&wait=10s", timeout=15))
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 1)
        self.assertNotIn("end", result)
        written = time.monotonic()
        self.put("svc/b", b"2")
        thread.join(5)
        status, resp, body = result["value"]
        self.assertLess(result["end"] - written, 1.0)
        self.assertEqual(status, 200)
        self.assertGreater(self.index_of(resp), idx)
        self.assertEqual(len(json.loads(body)), 2)

    def test_old_index_returns_immediately(self):
        self.put("svc/a", b"1")
        self.put("svc/a", b"2")
        idx = self.index_of(self.get("/v1/kv/svc/a")[1])
        start = time.monotonic()
        status, resp, _ = self.get(f"/v1/kv/svc/a?index={idx - 1}&wait=10s")
        self.assertLess(time.monotonic() - start, 0.3)
        self.assertEqual(self.index_of(resp), idx)
        start = time.monotonic()
        self.get("/v1/kv/svc/a?index=0&wait=10s")
        self.assertLess(time.monotonic() - start, 0.3)

    def test_wait_timeout_is_honoured(self):
        self.put("svc/a", b"1")
        idx = self.index_of(self.get("/v1/kv/svc/a")[1])
        start = time.monotonic()
        status, resp, body = self.get(f"/v1/kv/svc/a?index={idx}&wait=200ms")
        elapsed = time.monotonic() - start
        self.assertGreaterEqual(elapsed, 0.2)
        self.assertLess(elapsed, 0.4)
        self.assertEqual((status, self.index_of(resp)), (200, idx))

    def test_unrelated_write_does_not_wake(self):
        self.put("svc/a", b"1")
        idx = self.index_of(self.get("/v1/kv/svc/?recurse")[1])
        start = time.monotonic()
        thread, result = self.background(
            lambda: self.get(f"/v1/kv/svc/?recurse&index={idx}&wait=600ms"))
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 1)
        self.put("elsewhere", b"x")
        thread.join(5)
        self.assertGreaterEqual(result["end"] - start, 0.55)
        self.assertEqual(self.index_of(result["value"][1]), idx)

    def test_delete_wakes_blocking_recurse(self):
        self.put("svc/a", b"1")
        self.put("svc/b", b"1")
        idx = self.index_of(self.get("/v1/kv/svc/?recurse")[1])
        thread, result = self.background(
            lambda: self.get(f"/v1/kv/svc/?recurse&index={idx}&wait=10s"))
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 1)
        self.call("DELETE", "/v1/kv/svc/a")
        thread.join(3)
        self.assertGreater(self.index_of(result["value"][1]), idx)

    def test_client_disconnect_does_not_end_the_blocked_query(self):
        # Consul's blocking query never looks at its client: it (and its
        # connection) lasts until the index moves or the wait is over
        self.put("svc/a", b"1")
        idx = self.index_of(self.get("/v1/kv/svc/a")[1])
        sock = socket.create_connection((HOST, self.port))
        sock.sendall(f"GET /v1/kv/svc/a?index={idx}&wait=30s HTTP/1.1\r\n"
                     f"Host: x\r\n\r\n".encode())
        self.wait_for(lambda: self.stats()["blocking_by_path"].get("/v1/kv/svc/a") == 1)
        self.assertEqual(self.stats()["open_connections"], 1)
        sock.close()
        time.sleep(0.3)     # several of the emulator's 50 ms wake-ups
        self.assertEqual(self.stats()["blocking_in_flight"], 1, "still blocked")
        self.assertEqual(self.stats()["open_connections"], 1, "still held")
        self.put("svc/a", b"2")       # the change ends it; then it is gone
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 0)
        self.wait_for(lambda: self.stats()["open_connections"] == 0)

    def test_abandoned_query_ends_with_its_wait(self):
        self.put("svc/a", b"1")
        idx = self.index_of(self.get("/v1/kv/svc/a")[1])
        sock = socket.create_connection((HOST, self.port))
        sock.sendall(f"GET /v1/kv/svc/a?index={idx}&wait=1s HTTP/1.1\r\n"
                     f"Host: x\r\n\r\n".encode())
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 1)
        sock.close()
        t0 = time.monotonic()
        self.wait_for(lambda: self.stats()["open_connections"] == 0, timeout=4)
        self.assertGreater(time.monotonic() - t0, 0.5, "held until the wait ran out")

    def test_set_index_goes_backwards_and_releases_waiters(self):
        for i in range(6):
            self.put(f"svc/{i}", b"x")
        idx = self.index_of(self.get("/v1/kv/svc/?recurse")[1])
        self.assertGreater(idx, 3)
        thread, result = self.background(
            lambda: self.get(f"/v1/kv/svc/?recurse&index={idx}&wait=10s"))
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 1)
        self.control("set_index", {"index": 3})
        thread.join(3)
        self.assertLessEqual(self.index_of(result["value"][1]), 3)
        self.put("svc/new", b"y")
        self.assertEqual(self.index_of(self.get("/v1/kv/svc/new")[1]), 4)


class CatalogHealthTest(EmulatorCase):
    def setUp(self):
        super().setUp()
        self.register({"ID": "web1", "Name": "web", "Address": "10.0.0.1", "Port": 80,
                       "Tags": ["primary"], "Meta": {"weight": "3"},
                       "Weights": {"Passing": 5, "Warning": 1}})
        self.register({"ID": "web2", "Name": "web", "Address": "10.0.0.2", "Port": 81,
                       "Check": {"TTL": "10s"}})

    def test_catalog_service_and_tag_filter(self):
        status, resp, body = self.get("/v1/catalog/service/web")
        entries = json.loads(body)
        self.assertEqual(status, 200)
        self.assertEqual([e["ServiceID"] for e in entries], ["web1", "web2"])
        first = entries[0]
        self.assertEqual((first["ServiceAddress"], first["ServicePort"]), ("10.0.0.1", 80))
        self.assertEqual(first["ServiceWeights"], {"Passing": 5, "Warning": 1})
        self.assertEqual(first["ServiceMeta"], {"weight": "3"})
        self.assertEqual((first["Node"], first["Address"]), ("emu-node", "127.0.0.1"))
        self.assertEqual(self.index_of(resp), max(e["ModifyIndex"] for e in entries))
        _, _, body = self.get("/v1/catalog/service/web?tag=primary")
        self.assertEqual([e["ServiceID"] for e in json.loads(body)], ["web1"])
        self.assertEqual(self.get("/v1/catalog/service/unknown")[:3:2], (200, b"[]"))
        _, _, body = self.get("/v1/catalog/services")
        self.assertEqual(json.loads(body)["web"], ["primary"])

    def test_health_passing_filter_and_check_changes(self):
        _, resp, body = self.get("/v1/health/service/web")
        entries = json.loads(body)
        self.assertEqual(len(entries), 2)
        web2 = entries[1]
        self.assertEqual(web2["Service"]["Address"], "10.0.0.2")
        self.assertEqual(web2["Node"]["Address"], "127.0.0.1")
        self.assertEqual([c["CheckID"] for c in web2["Checks"]], ["serfHealth", "service:web2"])
        self.assertEqual(web2["Checks"][1]["Status"], "critical")
        _, _, body = self.get("/v1/health/service/web?passing")
        self.assertEqual([e["Service"]["ID"] for e in json.loads(body)], ["web1"])
        idx = self.index_of(resp)
        thread, result = self.background(
            lambda: self.get(f"/v1/health/service/web?passing&index={idx}&wait=10s"))
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 1)
        self.assertEqual(self.call("PUT", "/v1/agent/check/pass/service:web2")[0], 200)
        thread.join(3)
        _, resp2, body = result["value"]
        self.assertGreater(self.index_of(resp2), idx)
        self.assertEqual(len(json.loads(body)), 2)
        self.call("PUT", "/v1/agent/check/update/service:web2",
                  body=json.dumps({"Status": "warning"}).encode())
        _, _, body = self.get("/v1/health/service/web?passing=true")
        self.assertEqual(len(json.loads(body)), 1)
        _, _, body = self.get("/v1/health/service/web?passing=false")
        self.assertEqual(len(json.loads(body)), 2)
        self.assertEqual(self.get("/v1/health/service/unknown")[2], b"[]")

    def test_check_with_initial_status_and_deregister(self):
        self.register({"Name": "db", "Port": 5432, "Check": {"TTL": "10s", "Status": "passing"}})
        _, resp, body = self.get("/v1/health/service/db?passing")
        self.assertEqual([e["Service"]["ID"] for e in json.loads(body)], ["db"])
        idx = self.index_of(resp)
        self.assertEqual(self.call("PUT", "/v1/agent/service/deregister/db")[0], 200)
        _, resp, body = self.get("/v1/health/service/db")
        self.assertEqual(json.loads(body), [])
        self.assertGreater(self.index_of(resp), idx)
        self.assertEqual(self.call("PUT", "/v1/agent/service/deregister/db")[0], 404)

    def test_service_index_is_per_service(self):
        _, resp, _ = self.get("/v1/catalog/service/web")
        idx = self.index_of(resp)
        self.put("some/key", b"x")
        self.register({"Name": "other", "Port": 1})
        self.assertEqual(self.index_of(self.get("/v1/catalog/service/web")[1]), idx)

    def test_misc_endpoints(self):
        self.assertEqual(self.get("/v1/status/leader")[2], b'"127.0.0.1:8300"')
        cfg = json.loads(self.get("/v1/agent/self")[2])["Config"]
        self.assertEqual((cfg["Datacenter"], cfg["NodeName"]), ("dc1", "emu-node"))


class AclTest(EmulatorCase):
    ARGS = ("--acl-token", "master", "--acl-token", "s3cr3t=upstreams/")

    def setUp(self):
        super().setUp()
        for key in ("upstreams/a/1", "upstreams/a/2", "secret/x"):
            self.assertEqual(self.put(key, b"v", headers={"X-Consul-Token": "master"})[0], 200)

    def test_single_key_permissions(self):
        status, _, body = self.get("/v1/kv/upstreams/a/1")
        self.assertEqual(status, 403)
        self.assertTrue(body.startswith(b"Permission denied"), body)
        self.assertEqual(self.put("upstreams/a/3", b"v")[0], 403)
        self.assertEqual(self.get("/v1/kv/upstreams/a/1?token=s3cr3t")[0], 200)
        self.assertEqual(self.get("/v1/kv/upstreams/a/1",
                                  headers={"Authorization": "Bearer s3cr3t"})[0], 200)
        status, _, body = self.get("/v1/kv/secret/x", headers={"X-Consul-Token": "s3cr3t"})
        self.assertEqual(status, 403)
        self.assertTrue(body.startswith(b"Permission denied"))
        self.assertEqual(self.get("/v1/kv/secret/x", headers={"X-Consul-Token": "master"})[0], 200)
        status, _, body = self.get("/v1/kv/upstreams/a/1", headers={"X-Consul-Token": "bogus"})
        self.assertEqual((status, body), (403, b"ACL not found"))

    def test_recursive_filtering(self):
        status, _, body = self.get("/v1/kv/?recurse", headers={"X-Consul-Token": "bogus"})
        self.assertEqual((status, body), (403, b"ACL not found"))
        status, resp, body = self.get("/v1/kv/?recurse", headers={"X-Consul-Token": "s3cr3t"})
        self.assertEqual(status, 200)
        self.assertEqual([e["Key"] for e in json.loads(body)], ["upstreams/a/1", "upstreams/a/2"])
        self.assertEqual(resp.getheader("X-Consul-Results-Filtered-By-ACLs"), "true")
        status, resp, body = self.get("/v1/kv/upstreams/?recurse&token=s3cr3t")
        self.assertEqual(status, 200)
        self.assertIsNone(resp.getheader("X-Consul-Results-Filtered-By-ACLs"))
        status, resp, _ = self.get("/v1/kv/upstreams/?recurse")     # anonymous, deny
        self.assertEqual(status, 404)
        self.assertEqual(resp.getheader("X-Consul-Results-Filtered-By-ACLs"), "true")
        self.assertEqual(resp.getheader("X-Consul-Default-ACL-Policy"), "deny")

    def test_control_api_is_not_protected(self):
        self.assertIn("requests_total", self.stats())


class FaultTest(EmulatorCase):
    def setUp(self):
        super().setUp()
        self.put("upstreams/a/1", b"v")

    def fault(self, **spec):
        return self.control("fault", spec)["id"]

    def test_delay(self):
        self.fault(mode="delay", path_prefix="/v1/kv/upstreams/a", delay_ms=300)
        start = time.monotonic()
        self.assertEqual(self.get("/v1/kv/upstreams/a/1")[0], 200)
        self.assertGreaterEqual(time.monotonic() - start, 0.3)
        start = time.monotonic()
        self.get("/v1/kv/other")
        self.assertLess(time.monotonic() - start, 0.25)

    def test_status_and_count(self):
        self.fault(mode="status", path_prefix="/v1/kv/upstreams/", status=503,
                   body="No cluster leader", count=1)
        status, _, body = self.get("/v1/kv/upstreams/a/1")
        self.assertEqual((status, body), (503, b"No cluster leader"))
        self.assertEqual(self.get("/v1/kv/upstreams/a/1")[0], 200)

    def test_malformed(self):
        self.fault(mode="malformed")
        status, resp, body = self.get("/v1/kv/upstreams/a/?recurse")
        self.assertEqual(status, 200)
        self.assertEqual(int(resp.getheader("Content-Length")), len(body))
        with self.assertRaises(ValueError):
            json.loads(body)

    def test_truncate(self):
        self.fault(mode="truncate")
        with self.assertRaises(http.client.IncompleteRead):
            self.get("/v1/kv/upstreams/a/?recurse")

    def test_body_with_headers(self):
        self.fault(mode="body", body='[{"Key":"upstreams/a/1","Value":"!!"}]', status=200,
                   headers={"X-Consul-Index": None, "X-Extra": "1"})
        status, resp, body = self.get("/v1/kv/upstreams/a/?recurse")
        self.assertEqual((status, body), (200, b'[{"Key":"upstreams/a/1","Value":"!!"}]'))
        self.assertIsNone(resp.getheader("X-Consul-Index"))
        self.assertEqual(resp.getheader("X-Extra"), "1")

    def test_index_backwards(self):
        idx = self.index_of(self.get("/v1/kv/upstreams/a/?recurse")[1])
        self.fault(mode="index_backwards", count=1)
        start = time.monotonic()
        status, resp, body = self.get(f"/v1/kv/upstreams/a/?recurse&index={idx}&wait=10s")
        self.assertLess(time.monotonic() - start, 0.5)
        self.assertEqual((status, self.index_of(resp)), (200, 1))
        self.assertEqual(len(json.loads(body)), 1)
        self.assertEqual(self.index_of(self.get("/v1/kv/upstreams/a/?recurse")[1]), idx)

    def test_hang_until_cleared(self):
        self.fault(mode="hang", count=1)
        with self.assertRaises(TimeoutError):
            self.get("/v1/kv/upstreams/a/1", timeout=0.3)
        thread, result = self.background(lambda: self.get("/v1/kv/upstreams/a/1", timeout=10))
        thread.join(3)
        self.assertEqual(result["value"][0], 200)      # count=1: only the first hung
        self.fault(mode="hang")
        thread, result = self.background(lambda: self.get("/v1/kv/upstreams/a/1", timeout=10))
        time.sleep(0.2)
        self.assertNotIn("end", result)
        self.control("clear_faults")
        thread.join(3)
        self.assertIsInstance(result.get("error"), http.client.RemoteDisconnected)
        self.assertEqual(self.get("/v1/kv/upstreams/a/1")[0], 200)

    def test_close(self):
        self.fault(mode="close", count=1)
        with self.assertRaises(http.client.RemoteDisconnected):
            self.get("/v1/kv/upstreams/a/1")
        self.assertEqual(self.get("/v1/kv/upstreams/a/1")[0], 200)

    def test_refuse_same_port(self):
        keepalive = http.client.HTTPConnection(HOST, self.port, timeout=5)
        keepalive.request("GET", "/v1/kv/upstreams/a/1")
        self.assertEqual(keepalive.getresponse().read()[:1], b"[")
        idx = self.index_of(self.get("/v1/kv/upstreams/a/1")[1])
        thread, result = self.background(
            lambda: self.get(f"/v1/kv/upstreams/a/1?index={idx}&wait=10s"))
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 1)
        self.fault(mode="refuse")
        thread.join(3)
        self.assertIsInstance(result.get("error"), ConnectionError)
        with self.assertRaises(ConnectionError):
            self.get("/v1/kv/upstreams/a/1")
        with self.assertRaises((ConnectionError, http.client.RemoteDisconnected)):
            keepalive.request("GET", "/v1/kv/upstreams/a/1")
            keepalive.getresponse().read()
        keepalive.close()
        self.assertEqual(self.stats()["faults_active"], 1)
        self.control("clear_faults")
        self.assertEqual(self.get("/v1/kv/upstreams/a/1")[0], 200)

    def test_fault_validation(self):
        status, _, _ = self.call("POST", "/_emu/fault", body=b'{"mode":"explode"}')
        self.assertEqual(status, 400)
        fid = self.fault(mode="delay", delay_ms=1, path_prefix="/v1/x")
        self.assertEqual([f["id"] for f in self.control("faults", method="GET")], [fid])


class RefuseWithControlListenerTest(EmulatorCase):
    ARGS = ("--control-listen", f"{HOST}:0")

    def test_listener_really_closes_and_reopens(self):
        self.put("k", b"v")
        self.control("fault", {"mode": "refuse"})
        with self.assertRaises(ConnectionRefusedError):
            self.get("/v1/kv/k")
        self.assertEqual(self.get("/v1/kv/k", port=self.control_port)[0], 200)   # backdoor
        self.control("clear_faults")
        self.assertEqual(self.get("/v1/kv/k")[0], 200)


def raw_exchange(port: int, request: bytes, send_first: bool, timeout: float = 3.0):
    """Connects, sends ``request`` (before or after reading), returns
    (bytes received, the error that ended the read or None)."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    got, err = b"", None
    try:
        if send_first:
            sock.sendall(request)
        else:
            time.sleep(0.1)         # the server writes first
        while True:
            try:
                data = sock.recv(65536)
            except OSError as exc:
                err = exc
                break
            if not data:
                break
            got += data
    finally:
        sock.close()
    return got, err


class ConnectionLimitTest(EmulatorCase):
    """limits.http_max_conns_per_client, as go-connlimit enforces it in Consul."""
    ARGS = ("--max-conns-per-client", "3", "--control-listen", f"{HOST}:0")

    def hold(self, n):
        socks = [socket.create_connection((HOST, self.port)) for _ in range(n)]
        self.wait_for(lambda: self.stats()["conns_by_client"].get(HOST) == n)
        return socks

    def test_default_is_consuls(self):
        self.assertEqual(consul_emulator.DEFAULT_MAX_CONNS_PER_CLIENT, 200)
        self.assertEqual(consul_emulator.build_arg_parser().parse_args(
            ["--listen", "127.0.0.1:0"]).max_conns_per_client, 200)

    def test_over_the_limit_gets_429_at_once_then_close(self):
        socks = self.hold(3)
        # the answer comes without a request: written as soon as it is accepted
        got, _ = raw_exchange(self.port, b"", send_first=False)
        head, _, body = got.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), got)
        self.assertIn(b"Connection: close", head)
        self.assertEqual(body, b"Your IP is issuing too many concurrent connections, "
                               b"please rate limit your calls\n")
        self.assertEqual(self.stats()["refused_over_limit"], 1)
        # a request that arrived first is never read: the close is a reset, the
        # 429 may or may not be read before it
        got, err = raw_exchange(self.port, b"GET /v1/kv/x HTTP/1.1\r\nHost: x\r\n\r\n",
                                send_first=True)
        self.assertTrue(got.startswith(b"HTTP/1.1 429") or isinstance(err, ConnectionResetError)
                        or got == b"", (got, err))
        # the control listener is not limited
        self.assertEqual(self.stats()["conns_by_client"][HOST], 3)
        # a slot frees when a connection closes
        socks.pop().close()
        self.wait_for(lambda: self.stats()["conns_by_client"].get(HOST) == 2)
        self.assertEqual(self.get("/v1/status/leader")[0], 200)
        for s in socks:
            s.close()
        self.wait_for(lambda: HOST not in self.stats()["conns_by_client"])

    def test_abandoned_blocking_query_keeps_its_slot(self):
        self.put("svc/a", b"1", port=self.control_port)
        idx = self.index_of(self.get("/v1/kv/svc/a", port=self.control_port)[1])
        polls = []
        for _ in range(3):
            s = socket.create_connection((HOST, self.port))
            s.sendall(f"GET /v1/kv/svc/a?index={idx}&wait=30s HTTP/1.1\r\n"
                      f"Host: x\r\n\r\n".encode())
            polls.append(s)
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 3)
        for s in polls:
            s.close()           # the clients go away (an nginx reload)
        time.sleep(0.3)
        self.assertEqual(self.stats()["conns_by_client"].get(HOST), 3, "slots still held")
        got, _ = raw_exchange(self.port, b"", send_first=False)
        self.assertTrue(got.startswith(b"HTTP/1.1 429"), got)
        # the change ends the queries: their slots come back
        self.put("svc/a", b"2", port=self.control_port)
        self.wait_for(lambda: HOST not in self.stats()["conns_by_client"])
        self.assertEqual(self.get("/v1/kv/svc/a")[0], 200)

    def test_control_connections_hold_no_slot(self):
        socks = self.hold(2)
        # a control request on the main port takes a slot only until it is seen
        conn = http.client.HTTPConnection(HOST, self.port, timeout=3)
        conn.request("GET", "/_emu/stats")
        self.assertEqual(conn.getresponse().read()[:1], b"{")
        self.wait_for(lambda: self.stats()["conns_by_client"].get(HOST) == 2)
        self.assertEqual(self.get("/v1/status/leader")[0], 200)
        conn.close()
        for s in socks:
            s.close()


class NoConnectionLimitTest(EmulatorCase):
    ARGS = ("--max-conns-per-client", "0")

    def test_zero_turns_it_off(self):
        socks = [socket.create_connection((HOST, self.port)) for _ in range(210)]
        self.wait_for(lambda: self.stats()["conns_by_client"].get(HOST) == 210)
        self.assertEqual(self.get("/v1/status/leader")[0], 200)
        self.assertEqual(self.stats()["refused_over_limit"], 0)
        for s in socks:
            s.close()


class StatsTest(EmulatorCase):
    def test_counters_and_connections(self):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        for _ in range(3):
            conn.request("GET", "/v1/kv/missing")
            conn.getresponse().read()
        stats = self.stats()
        self.assertEqual(stats["requests_total"], 3)
        self.assertEqual(stats["requests"], {"GET /v1/kv/missing": 3})
        self.assertEqual(stats["open_connections"], 1)
        self.assertEqual(stats["connections_total"], 1)
        self.assertGreaterEqual(stats["control_requests_total"], 1)
        conn.close()
        self.wait_for(lambda: self.stats()["open_connections"] == 0)
        self.control("reset_stats")
        stats = self.stats()
        self.assertEqual((stats["requests_total"], stats["requests"]), (0, {}))

    def test_blocking_in_flight(self):
        self.put("b/k", b"1")
        idx = self.index_of(self.get("/v1/kv/b/k")[1])
        threads = [self.background(lambda: self.get(f"/v1/kv/b/k?index={idx}&wait=10s"))[0]
                   for _ in range(2)]
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 2)
        stats = self.stats()
        self.assertEqual(stats["blocking_by_path"], {"/v1/kv/b/k": 2})
        self.assertEqual(stats["open_connections"], 2)
        self.put("b/k", b"2")
        for thread in threads:
            thread.join(3)
        self.wait_for(lambda: self.stats()["blocking_in_flight"] == 0)
        self.assertEqual(self.stats()["blocking_by_path"], {})

    def test_sigterm_exits_cleanly(self):
        self.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.proc.wait(5), 0)


if __name__ == "__main__":
    unittest.main()
