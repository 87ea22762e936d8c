"""Load test of `editbank serve`: N concurrent clients for a bounded time, then a check of the store.

Starts `editbank serve` on a free loopback port (its own process) with a fresh store. Each client loops, choosing:

- a completion (most requests);
- an edit of a fact no one has edited yet;
- an undo of one of its own acknowledged edits;
- a deliberate bad request: no token (401), an oversized body (413) or malformed JSON (422).

It reports p50/p99 latency per kind, throughput and any unexpected status. Afterwards, with the server stopped, it
opens the store file and checks that it holds exactly the acknowledged edits (no lost or phantom edits), each
with the status its acknowledgements imply.

    python benchmarks/serve_load.py --clients 16 --seconds 60 [--model world:default] [--method sola]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from editbank import World
from editbank.store import EditStore

TOKEN = "load-test-token-" + "x" * 16
KINDS = ("completion", "edit", "undo", "bad")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Shared:
    def __init__(self, requests) -> None:
        self.lock = threading.Lock()
        self.pool = list(requests)
        self.acked: dict[int, str] = {}  # edit id -> status the acknowledgements imply
        self.lat: dict[str, list[float]] = {k: [] for k in KINDS}
        self.unexpected: list[str] = []
        self.deliberate = 0

    def next_request(self):
        with self.lock:
            return self.pool.pop() if self.pool else None


def client(base: str, shared: Shared, stop: float, seed: int, prompts: list[str]) -> None:
    rng = random.Random(seed)
    mine: list[int] = []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, timeout=120) as http:
        while time.time() < stop:
            roll = rng.random()
            kind = "completion" if roll < 0.7 else "edit" if roll < 0.85 else "undo" if roll < 0.95 else "bad"
            t0 = time.perf_counter()
            if kind == "completion":
                res, want = http.post("/v1/completions", json={"prompt": rng.choice(prompts), "max_tokens": 6}), 200
            elif kind == "edit":
                req = shared.next_request()
                if req is None:
                    continue
                # check: False: this measures load; an edit that does not take would be a 422, not an ack
                body = {"prompt": req.prompt, "target": req.target, "subject": req.subject, "check": False}
                res, want = http.post("/v1/edits", json=body, headers=auth), 201
                if res.status_code == 201:
                    mine.append(res.json()["id"])
                    with shared.lock:
                        shared.acked[res.json()["id"]] = "active"
            elif kind == "undo":
                if not mine:
                    continue
                eid = mine.pop(rng.randrange(len(mine)))
                res, want = http.delete(f"/v1/edits/{eid}", headers=auth), 200
                if res.status_code == 200:
                    with shared.lock:
                        shared.acked[eid] = "reverted"
            else:
                which = rng.randrange(3)
                if which == 0:
                    res, want = http.post("/v1/edits", json={"prompt": "a", "target": "b"}), 401
                elif which == 1:
                    res, want = http.post("/v1/edits", content=b"x" * (2 << 20), headers=auth), 413
                else:
                    res, want = http.post("/v1/edits", content=b'{"prompt": ', headers={
                        **auth, "Content-Type": "application/json"}), 422
            dt = time.perf_counter() - t0
            with shared.lock:
                shared.lat[kind].append(dt)
                if res.status_code != want:
                    shared.unexpected.append(f"{kind}: {res.status_code} {res.text[:200]}")
                elif kind == "bad":
                    shared.deliberate += 1


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--model", default="world:default")
    ap.add_argument("--method", default="sola")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    world = World.build(args.model.split(":", 1)[1], progress=False)
    requests = world.edit_requests(n=len(world.editable_facts), seed=0)
    prompts = [r.prompt for r in requests] + [p for r in requests for p, _ in r.locality][:200]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "serve.db"
        env = {**os.environ, "EDITBANK_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "editbank.cli", "serve", "--model", str(world.path),
                                 "--method", args.method, "--store", str(store), "--port", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.2)
        shared = Shared(requests)
        stop = time.time() + args.seconds
        threads = [threading.Thread(target=client, args=(base, shared, stop, i, prompts)) for i in range(args.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        live = {e["id"]: e["status"] for e in httpx.get(base + "/v1/edits", timeout=60).json()["data"]}
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        stored = {e.id: e.status for e in EditStore(store).edits()}
    lost = sorted(set(shared.acked) - set(stored))
    phantom = sorted(set(stored) - set(shared.acked))
    wrong = sorted(e for e in shared.acked if e in stored and stored[e] != shared.acked[e])
    n = sum(len(v) for v in shared.lat.values())
    fig = {"clients": args.clients, "seconds": round(wall, 1), "requests": n, "throughput_rps": round(n / wall, 1),
           "by_kind": {k: {"n": len(v), "p50_ms": round(1000 * pct(v, 50), 1), "p99_ms": round(1000 * pct(v, 99), 1)}
                       for k, v in shared.lat.items() if v},
           "deliberate_bad_requests": shared.deliberate, "unexpected": len(shared.unexpected),
           "acknowledged_edits": len(shared.acked), "acknowledged_undos": sum(s == "reverted" for s in
                                                                             shared.acked.values()),
           "store_edits": len(stored), "lost": lost, "phantom": phantom, "wrong_status": wrong,
           "api_matches_store": live == stored}
    if args.json:
        print(json.dumps(fig))
    else:
        for k, v in fig["by_kind"].items():
            print(f"{k:>10}: n={v['n']:5d}  p50 {v['p50_ms']:8.1f} ms  p99 {v['p99_ms']:8.1f} ms")
        print(f"{n} requests in {wall:.1f} s = {fig['throughput_rps']} req/s from {args.clients} clients; "
              f"{shared.deliberate} deliberate bad requests answered as expected; {len(shared.unexpected)} unexpected")
        for u in shared.unexpected[:10]:
            print("  unexpected:", u)
        print(f"store: {len(stored)} edits; acknowledged {len(shared.acked)} edits and {fig['acknowledged_undos']} "
              f"undos; lost {lost}; phantom {phantom}; wrong status {wrong}; API list == store: "
              f"{fig['api_matches_store']}")
    if lost or phantom or wrong or shared.unexpected:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
