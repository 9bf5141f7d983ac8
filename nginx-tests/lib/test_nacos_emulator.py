"""Self-test for nacos_emulator.py (stdlib unittest only).

Run from the repository root:
    python3 -m unittest discover -s nginx-tests/lib -p 'test_*.py'

Each test starts its own emulator subprocess on 127.0.0.1:0 and stops it (by the PID
it started) in tearDown.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import unittest
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR = os.path.join(HERE, "nacos_emulator.py")
HOST = "127.0.0.1"
V1 = "/nacos/v1/ns/instance/list"
V2 = "/nacos/v2/ns/instance/list"
V3 = "/nacos/v3/client/ns/instance/list"


class Case(unittest.TestCase):
    ARGS: tuple = ()

    def setUp(self):
        self.proc = subprocess.Popen([sys.executable, EMULATOR, "--listen", f"{HOST}:0",
                                      *self.ARGS], stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        self.assertTrue(ready, "emulator did not start")
        line = self.proc.stdout.readline().strip()
        self.assertTrue(line.startswith("nacos-emulator listening on 127.0.0.1:"), line)
        self.port = int(line.rsplit(":", 1)[1])

    def tearDown(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()

    def call(self, method, path, params=None, form=None, json_body=None):
        if params:
            path += "?" + urllib.parse.urlencode(params)
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            headers, body = {}, None
            if form is not None:
                body = urllib.parse.urlencode(form)
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            if json_body is not None:
                body = json.dumps(json_body)
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            try:
                return r.status, json.loads(data)
            except ValueError:
                return r.status, data.decode()
        finally:
            conn.close()

    def register(self, ip, port, **kw):
        p = {"serviceName": "svc", "ip": ip, "port": port, **kw}
        return self.call("POST", "/nacos/v1/ns/instance", form=p)


class Shapes(Case):
    def test_three_shapes_and_filters(self):
        self.assertEqual(self.register("10.0.0.1", 80, weight=0.5,
                                       metadata='{"max_fails":"3"}')[0], 200)
        self.register("10.0.0.2", 80, clusterName="B", healthy="false")
        s, v1 = self.call("GET", V1, {"serviceName": "svc"})
        self.assertEqual(s, 200)
        self.assertEqual(v1["name"], "DEFAULT_GROUP@@svc")
        self.assertEqual([(h["ip"], h["weight"], h["healthy"]) for h in v1["hosts"]],
                         [("10.0.0.1", 0.5, True), ("10.0.0.2", 1.0, False)])
        self.assertEqual(v1["hosts"][0]["metadata"], {"max_fails": "3"})
        s, v2 = self.call("GET", V2, {"serviceName": "svc", "healthyOnly": "true"})
        self.assertEqual((s, v2["code"], len(v2["data"]["hosts"])), (200, 0, 1))
        s, v3 = self.call("GET", V3, {"serviceName": "svc", "clusterName": "B"})
        self.assertEqual((s, v3["code"]), (200, 0))
        self.assertIsInstance(v3["data"], list)
        self.assertEqual([h["ip"] for h in v3["data"]], ["10.0.0.2"])
        s, v1 = self.call("GET", V1, {"serviceName": "svc", "clusters": "DEFAULT"})
        self.assertEqual([h["ip"] for h in v1["hosts"]], ["10.0.0.1"])
        _, stats = self.call("GET", "/_emu/stats")
        self.assertEqual(stats["healthy_only"], [None, "true", None, None])

    def test_update_health_and_delete(self):
        self.register("10.0.0.1", 80)
        self.call("PUT", "/nacos/v1/ns/instance",
                  form={"serviceName": "svc", "ip": "10.0.0.1", "port": 80,
                        "enabled": "false", "weight": "2.5"})
        _, v1 = self.call("GET", V1, {"serviceName": "svc"})
        self.assertEqual((v1["hosts"][0]["enabled"], v1["hosts"][0]["weight"]), (False, 2.5))
        self.call("PUT", "/nacos/v1/ns/health",
                  form={"serviceName": "svc", "ip": "10.0.0.1", "port": 80, "healthy": "false"})
        _, v1 = self.call("GET", V1, {"serviceName": "svc"})
        self.assertFalse(v1["hosts"][0]["healthy"])
        self.call("DELETE", "/nacos/v1/ns/instance",
                  {"serviceName": "svc", "ip": "10.0.0.1", "port": 80})
        _, v1 = self.call("GET", V1, {"serviceName": "svc"})
        self.assertEqual(v1["hosts"], [])

    def test_missing_service_and_unserved_apis(self):
        s, v3 = self.call("GET", V3, {"serviceName": "nope"})
        self.assertEqual((s, v3["code"]), (404, 21008))
        s, v2 = self.call("GET", V2, {"serviceName": "nope"})
        self.assertEqual((s, v2["data"]["hosts"]), (200, []))
        self.call("POST", "/_emu/apis", json_body={"apis": ["v1"], "missing_status": 410})
        s, page = self.call("GET", V3, {"serviceName": "svc"})
        self.assertEqual((s, page["status"]), (410, 410))
        self.assertNotIn("code", page)
        self.assertEqual(self.call("GET", V1, {"serviceName": "svc"})[0], 200)

    def test_faults(self):
        self.call("POST", "/_emu/fault", json_body={"mode": "status", "status": 503,
                                                     "path_prefix": V1, "count": 1})
        self.assertEqual(self.call("GET", V1, {"serviceName": "svc"})[0], 503)
        self.assertEqual(self.call("GET", V1, {"serviceName": "svc"})[0], 200)
        self.call("POST", "/_emu/fault", json_body={"mode": "body", "body": "{\"x\":1}"})
        self.assertEqual(self.call("GET", V1, {"serviceName": "svc"}), (200, {"x": 1}))
        self.call("POST", "/_emu/clear_faults")
        self.assertEqual(self.call("GET", V1, {"serviceName": "svc"})[0], 200)


class Auth(Case):
    ARGS = ("--auth", "upsync:pw", "--token-ttl", "60", "--login-apis", "v3")

    def test_login_token_expiry(self):
        s, body = self.call("GET", V1, {"serviceName": "svc"})
        self.assertEqual((s, body), (403, "user not found!"))
        s, _ = self.call("POST", "/nacos/v1/auth/login", form={"username": "upsync", "password": "pw"})
        self.assertEqual(s, 404, "only the v3 login is served")
        s, bad = self.call("POST", "/nacos/v3/auth/user/login", form={"username": "upsync", "password": "x"})
        self.assertEqual((s, bad), (403, "unknown user!"))
        s, ok = self.call("POST", "/nacos/v3/auth/user/login", form={"username": "upsync", "password": "pw"})
        self.assertEqual((s, ok["code"], ok["data"]["tokenTtl"]), (200, 0, 60))
        token = ok["data"]["accessToken"]
        self.assertEqual(self.call("GET", V1, {"serviceName": "svc", "accessToken": token})[0], 200)
        self.assertEqual(self.call("GET", V1, {"serviceName": "svc", "accessToken": "x"}),
                         (403, "token invalid!"))
        self.call("POST", "/_emu/expire_tokens")
        self.assertEqual(self.call("GET", V1, {"serviceName": "svc", "accessToken": token}),
                         (403, "token expired!"))
        _, stats = self.call("GET", "/_emu/stats")
        self.assertEqual((stats["logins"], stats["refused"]), (1, 4))


if __name__ == "__main__":
    unittest.main()
