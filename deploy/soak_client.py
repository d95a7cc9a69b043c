#!/usr/bin/env python3
"""Clients for deploy/soak.sh; each runs for a bounded time and prints one JSON object.

  soak_client.py http URL SECONDS THREADS [SOURCE]
      New-connection HTTP GETs back to back from THREADS threads (from SOURCE if
      given). Prints {"ok": N, "fail": N, "bodies": {body: count}, "errors": [...]}.
  soak_client.py hold HOST PORT CONNS SECONDS [SOURCE]
      CONNS long-lived TCP connections to the echo server; once a second each sends a
      line and expects it back. Prints {"conns": [{"backend": NAME, "rounds": N,
      "failed": null or "what, after N s"}]}.
"""
import http.client
import json
import socket
import sys
import threading
import time


def http_load(url, seconds, threads, source=None):
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    port = int(port or 80)
    path = "/" + path
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    res = {"ok": 0, "fail": 0, "bodies": {}, "errors": []}

    def worker():
        while time.monotonic() < stop:
            try:
                c = http.client.HTTPConnection(
                    host, port, timeout=5, source_address=(source, 0) if source else None
                )
                c.request("GET", path)
                body = c.getresponse().read().decode().strip()
                c.close()
                with lock:
                    res["ok"] += 1
                    key = body.rsplit(":", 1)[0] if body.startswith("peer ") else body
                    res["bodies"][key] = res["bodies"].get(key, 0) + 1
            except OSError as e:
                with lock:
                    res["fail"] += 1
                    if len(res["errors"]) < 20:
                        res["errors"].append(f"{time.strftime('%H:%M:%S')} {e!r}")
                time.sleep(0.05)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return res


def hold(host, port, conns, seconds, source=None):
    start = time.monotonic()
    out = []
    socks = []
    for i in range(conns):
        s = socket.create_connection(
            (host, port), timeout=5, source_address=(source, 0) if source else None
        )
        f = s.makefile("rwb")
        f.write(b"hello\n")
        f.flush()
        backend = f.readline().decode().strip().split(":", 1)[0]
        socks.append((s, f))
        out.append({"backend": backend, "rounds": 0, "failed": None})
    n = 0
    while time.monotonic() - start < seconds:
        time.sleep(1)
        n += 1
        for (s, f), o in zip(socks, out):
            if o["failed"]:
                continue
            try:
                f.write(f"round {n}\n".encode())
                f.flush()
                got = f.readline().decode().strip()
                if not got.endswith(f"round {n}"):
                    raise OSError(f"answer {got!r}")
                o["rounds"] += 1
            except OSError as e:
                o["failed"] = f"{e!r} after {time.monotonic() - start:.0f} s"
    for s, _ in socks:
        s.close()
    return {"conns": out}


def main():
    mode = sys.argv[1]
    if mode == "http":
        url, seconds, threads = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
        source = sys.argv[5] if len(sys.argv) > 5 else None
        print(json.dumps(http_load(url, seconds, threads, source)))
    elif mode == "hold":
        host, port, conns, seconds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
        source = sys.argv[6] if len(sys.argv) > 6 else None
        print(json.dumps(hold(host, port, conns, seconds, source)))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
