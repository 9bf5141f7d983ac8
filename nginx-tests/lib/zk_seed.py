#!/usr/bin/env python3
"""Seeds and changes a ZooKeeper tree for the tests (through kazoo).

Usage: zk_seed.py HOSTS [--auth USER:PASS] [--timeout S] OPS_JSON

OPS_JSON is a list of operations, run in order over one session:
  ["ensure", PATH]                      create PATH and its parents (empty data)
  ["create", PATH, DATA]                create (parents too); DATA is text
  ["create_acl", PATH, DATA, "U:P"]     create with an ACL giving only digest U:P access
  ["set", PATH, DATA]                   change data
  ["acl_open", PATH]                    give everyone every right on PATH (world:anyone)
  ["put", PATH, DATA]                   create (parents too) or change data
  ["delete", PATH]                      delete (missing is fine)
  ["rdelete", PATH]                     delete recursively (missing is fine)
  ["delete_tree", PATH]                 delete PATH and its children in one transaction
                                        (missing is fine; grandchildren are not allowed)
  ["bulk", PATH, N, DATA]               create N children 10.A.B.C:80 under PATH (async)
  ["children", PATH]                    print the children (JSON list)
  ["get", PATH]                         print the data
  ["sleep", SECONDS]
Each operation prints one line "T_MS OP PATH" (T_MS: wall clock just before it ran,
in ms) followed, for children/get, by a line "= JSON". Exit status 1 on an error,
with the error on stderr.
"""

import json
import sys
import time


def main(argv):
    try:
        from kazoo.client import KazooClient
        from kazoo.exceptions import NoNodeError
        from kazoo.retry import KazooRetry
        from kazoo.security import make_digest_acl
    except ImportError:
        print("kazoo is not installed (pip install kazoo)", file=sys.stderr)
        return 3
    args = argv[1:]
    auth = None
    timeout = 10.0
    while args and args[0].startswith("--"):
        if args[0] == "--auth":
            auth = args[1]
        elif args[0] == "--timeout":
            timeout = float(args[1])
        else:
            print("unknown option " + args[0], file=sys.stderr)
            return 2
        args = args[2:]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    hosts, ops = args[0], json.loads(args[1])
    retry = KazooRetry(max_tries=-1, deadline=timeout)
    zk = KazooClient(
        hosts=hosts,
        timeout=timeout,
        connection_retry=KazooRetry(max_tries=-1, deadline=timeout),
        command_retry=retry,
        auth_data=[("digest", auth)] if auth else None,
    )
    zk.start(timeout=timeout)
    try:
        for op in ops:
            name, rest = op[0], op[1:]
            path = rest[0] if rest and isinstance(rest[0], str) else ""
            print("%d %s %s" % (int(time.time() * 1000), name, path), flush=True)
            if name == "ensure":
                zk.retry(zk.ensure_path, path)
            elif name == "create":
                zk.retry(zk.create, path, str(rest[1]).encode(), makepath=True)
            elif name == "create_acl":
                user, password = rest[2].split(":", 1)
                acl = [make_digest_acl(user, password, all=True)]
                zk.retry(zk.create, path, str(rest[1]).encode(), acl=acl, makepath=True)
            elif name == "set":
                zk.retry(zk.set, path, str(rest[1]).encode())
            elif name == "acl_open":
                from kazoo.security import OPEN_ACL_UNSAFE
                zk.retry(zk.set_acls, path, OPEN_ACL_UNSAFE)
            elif name == "put":
                data = str(rest[1]).encode()
                if zk.retry(zk.exists, path):
                    zk.retry(zk.set, path, data)
                else:
                    zk.retry(zk.create, path, data, makepath=True)
            elif name == "delete":
                try:
                    zk.retry(zk.delete, path)
                except NoNodeError:
                    pass
            elif name == "rdelete":
                try:
                    zk.retry(zk.delete, path, recursive=True)
                except NoNodeError:
                    pass
            elif name == "delete_tree":
                try:
                    children = zk.retry(zk.get_children, path)
                except NoNodeError:
                    children = None
                if children is not None:
                    t = zk.transaction()
                    for c in children:
                        t.delete(path + "/" + c)
                    t.delete(path)
                    results = t.commit()
                    bad = [r for r in results if isinstance(r, Exception)]
                    if bad:
                        raise bad[0]
            elif name == "bulk":
                n, data = int(rest[1]), str(rest[2]).encode()
                zk.retry(zk.ensure_path, path)
                pending = []
                for i in range(n):
                    child = "%s/10.%d.%d.%d:80" % (path, i // 62500, (i // 250) % 250, i % 250 + 1)
                    pending.append(zk.create_async(child, data))
                    if len(pending) >= 500:
                        for p in pending:
                            p.get(timeout=timeout)
                        pending = []
                for p in pending:
                    p.get(timeout=timeout)
            elif name == "children":
                print("= " + json.dumps(sorted(zk.retry(zk.get_children, path))), flush=True)
            elif name == "get":
                data, _ = zk.retry(zk.get, path)
                print("= " + json.dumps(data.decode(errors="replace")), flush=True)
            elif name == "sleep":
                time.sleep(float(rest[0]))
            else:
                print("unknown operation %r" % name, file=sys.stderr)
                return 2
    except Exception as e:  # reported to the test, which fails with it
        print("%s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    finally:
        zk.stop()
        zk.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
