#!/usr/bin/env python3
"""Many short TCP flows, as web or backup traffic makes them: WORKERS clients each upload
SIZE bytes over a new connection, wait for the server's count, close, and start again
(a closed loop), for SECONDS.

usage: flows.py server PORT
       flows.py client HOST PORT WORKERS SIZE SECONDS

The client prints JSON: {"bytes": acknowledged bytes, "flows": completed flows,
"failed": failed flows, "mbit_s": average rate, "per_second": [Mbit/s each second]}.
"""
import json
import socket
import socketserver
import sys
import threading
import time


class Upload(socketserver.BaseRequestHandler):
    def handle(self):
        total = 0
        while True:
            d = self.request.recv(262144)
            if not d:
                break
            total += len(d)
        self.request.sendall(total.to_bytes(8, "big"))


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def serve(port):
    Server(("0.0.0.0", port), Upload).serve_forever()


def client(host, port, workers, size, seconds):
    chunk = b"\xd7" * 65536
    lock = threading.Lock()
    start = time.monotonic()
    end = start + seconds
    buckets = [0] * (int(seconds) + 1)
    stats = {"bytes": 0, "flows": 0, "failed": 0}

    def account(n):
        sec = min(int(time.monotonic() - start), len(buckets) - 1)
        with lock:
            buckets[sec] += n

    def worker():
        while time.monotonic() < end:
            try:
                with socket.create_connection((host, port), timeout=10) as s:
                    left = size
                    while left > 0:
                        n = s.send(chunk[: min(left, len(chunk))])
                        left -= n
                        account(n)
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while len(got) < 8:
                        d = s.recv(8 - len(got))
                        if not d:
                            break
                        got += d
                    ok = len(got) == 8 and int.from_bytes(got, "big") == size
                with lock:
                    if ok:
                        stats["bytes"] += size
                        stats["flows"] += 1
                    else:
                        stats["failed"] += 1
            except OSError:
                with lock:
                    stats["failed"] += 1
                time.sleep(0.1)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.monotonic() - start
    stats["mbit_s"] = round(stats["bytes"] * 8 / elapsed / 1e6, 3)
    stats["per_second"] = [round(b * 8 / 1e6, 3) for b in buckets[: int(seconds)]]
    print(json.dumps(stats))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
