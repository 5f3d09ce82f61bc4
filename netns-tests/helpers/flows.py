#!/usr/bin/env python3
"""Many short TCP flows, as web or backup traffic makes them: each uploads SIZE bytes over
a new connection, waits for the server's count and closes. Without RATE, WORKERS clients
do this back to back (a closed loop); with RATE, flows arrive at random (Poisson) at RATE
per second (an open loop, the offered load being RATE x SIZE), at most WORKERS at once
(arrivals beyond that are counted as rejected). Runs for SECONDS.

usage: flows.py server PORT [STATS]
       flows.py client HOST PORT WORKERS SIZE SECONDS [RATE]

The server counts the bytes it receives; with STATS it rewrites that file every 0.2 s
with "<unix time> <bytes received so far>" (delivered goodput, whatever became of the
flows).

The client prints JSON: {"bytes": acknowledged bytes, "flows": completed flows,
"failed": failed flows, "rejected": arrivals over WORKERS, "mbit_s": average rate,
"per_second": [Mbit/s of uploads completed (acknowledged by the server) each second]}.
"""
import random
import json
import socket
import socketserver
import sys
import threading
import time


RECEIVED = [0]
RECEIVED_LOCK = threading.Lock()


class Upload(socketserver.BaseRequestHandler):
    def handle(self):
        total = 0
        while True:
            d = self.request.recv(262144)
            if not d:
                break
            total += len(d)
            with RECEIVED_LOCK:
                RECEIVED[0] += len(d)
        self.request.sendall(total.to_bytes(8, "big"))


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def serve(port, stats=None):
    if stats:
        import os

        def write():
            while True:
                with RECEIVED_LOCK:
                    n = RECEIVED[0]
                with open(stats + ".tmp", "w") as f:
                    f.write("%f %d\n" % (time.time(), n))
                os.replace(stats + ".tmp", stats)
                time.sleep(0.2)

        threading.Thread(target=write, daemon=True).start()
    Server(("0.0.0.0", port), Upload).serve_forever()


def client(host, port, workers, size, seconds, rate=None):
    chunk = b"\xd7" * 65536
    lock = threading.Lock()
    start = time.monotonic()
    end = start + seconds
    buckets = [0] * (int(seconds) + 1)
    stats = {"bytes": 0, "flows": 0, "failed": 0, "rejected": 0}

    def account(n):
        sec = min(int(time.monotonic() - start), len(buckets) - 1)
        with lock:
            buckets[sec] += n

    def one():
        ok = False
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                left = size
                while left > 0:
                    n = s.send(chunk[: min(left, len(chunk))])
                    left -= n
                s.shutdown(socket.SHUT_WR)
                got = b""
                while len(got) < 8:
                    d = s.recv(8 - len(got))
                    if not d:
                        break
                    got += d
                ok = len(got) == 8 and int.from_bytes(got, "big") == size
            if ok:
                account(size)
            with lock:
                if ok:
                    stats["bytes"] += size
                    stats["flows"] += 1
                else:
                    stats["failed"] += 1
        except OSError:
            with lock:
                stats["failed"] += 1
            return False
        return ok

    def worker():
        while time.monotonic() < end:
            if not one():
                time.sleep(0.1)

    if rate is None:
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
    else:
        slots = threading.Semaphore(workers)
        threads = []

        def flow():
            try:
                one()
            finally:
                slots.release()

        rng = random.Random(7)
        t_next = time.monotonic()
        while True:
            t_next += rng.expovariate(rate)
            if t_next >= end:
                break
            time.sleep(max(0.0, t_next - time.monotonic()))
            if slots.acquire(blocking=False):
                t = threading.Thread(target=flow, daemon=True)
                t.start()
                threads.append(t)
            else:
                with lock:
                    stats["rejected"] += 1
    for t in threads:
        t.join(max(0.1, end + 30 - time.monotonic()))
    elapsed = time.monotonic() - start
    stats["mbit_s"] = round(stats["bytes"] * 8 / elapsed / 1e6, 3)
    stats["per_second"] = [round(b * 8 / 1e6, 3) for b in buckets[: int(seconds)]]
    print(json.dumps(stats))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]) if len(sys.argv) > 7 else None)
