"""Load test of `editbank serve`: throughput and latency, batched vs one request at a time, then a check of the store.

Starts `editbank serve` on a free loopback port (its own process, one thread) with a fresh store, twice: with
`--max-batch 1` (one request at a time) and batched (`--max-batch 32`). In one run it measures:

1. completions only (8-token greedy), at 1, 4 and 16 clients, on both servers: throughput and p50/p99;
2. on the batched server: completion p50/p99 at 16 clients while one more client streams edits and undos, then
   edits alone (an undo by replay holds the model; an edit a method computes beside readers does not), against the
   idle figure of step 1;
3. on the batched server: the mixed load (completions, edits, undos, deliberate bad requests: no token 401, an
   oversized body 413, malformed JSON 422) at `--clients`, then, with the server stopped, that the store holds
   exactly the acknowledged edits (no lost or phantom edits), each with the status its acknowledgements imply.

    python benchmarks/serve_load.py [--seconds 20] [--clients 16] [--model world:default] [--method sola]
"""

from __future__ import annotations

import argparse
import http.client
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


class Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.content = status, body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class Http:
    """A keep-alive HTTP/1.1 client on the standard library: far less client CPU per request than httpx, so that
    on a small machine the load generator takes less of the cores the server is measured on."""

    def __init__(self, base: str, timeout: float = 120) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.addr, self.timeout = (host, int(port)), timeout
        self.conn = None

    def request(self, method: str, path: str, json_body=None, content: bytes | None = None, headers=None) -> Reply:
        body = content if content is not None else (json.dumps(json_body).encode() if json_body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(*self.addr, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=hdrs)
                res = self.conn.getresponse()
                data = res.read()
                if res.getheader("connection", "").lower() == "close":
                    self.close()
                return Reply(res.status, data)
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post(self, path: str, json=None, content: bytes | None = None, headers=None) -> Reply:
        return self.request("POST", path, json, content, headers)

    def delete(self, path: str, headers=None) -> Reply:
        return self.request("DELETE", path, headers=headers)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MIXED = (("completion", 0.7), ("edit", 0.15), ("undo", 0.1), ("bad", 0.05))


def client(base: str, shared: Shared, stop: float, seed: int, prompts: list[str], mix=MIXED) -> None:
    rng = random.Random(seed)
    mine: list[int] = []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    kinds, weights = zip(*mix)
    with Http(base) as web:
        while time.time() < stop:
            kind = rng.choices(kinds, weights)[0]
            t0 = time.perf_counter()
            if kind == "completion":
                res, want = web.post("/v1/completions", json={"prompt": rng.choice(prompts), "max_tokens": 8}), 200
            elif kind == "edit":
                req = shared.next_request()
                if req is None:
                    time.sleep(0.01)
                    continue
                # check: False: this measures load; an edit that does not take would be a 422, not an ack
                body = {"prompt": req.prompt, "target": req.target, "subject": req.subject, "check": False}
                res, want = web.post("/v1/edits", json=body, headers=auth), 201
                if res.status_code == 201:
                    mine.append(res.json()["id"])
                    with shared.lock:
                        shared.acked[res.json()["id"]] = "active"
            elif kind == "undo":
                if not mine:
                    time.sleep(0.01)
                    continue
                eid = mine.pop(rng.randrange(len(mine)))
                res, want = web.delete(f"/v1/edits/{eid}", headers=auth), 200
                if res.status_code == 200:
                    with shared.lock:
                        shared.acked[eid] = "reverted"
            else:
                which = rng.randrange(3)
                if which == 0:
                    res, want = web.post("/v1/edits", json={"prompt": "a", "target": "b"}), 401
                elif which == 1:
                    res, want = web.post("/v1/edits", content=b"x" * (2 << 20), headers=auth), 413
                else:
                    res, want = web.post("/v1/edits", content=b'{"prompt": ', headers={
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


class Server:
    """`editbank serve` in its own process on a free port, with a fresh store in `folder`."""

    def __init__(self, world, method: str, max_batch: int, folder: Path, extra: tuple[str, ...] = ()) -> None:
        self.store = folder / f"serve-{max_batch}.db"
        port = free_port()
        env = {**os.environ, "EDITBANK_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "editbank.cli", "serve", "--model", str(world.path),
                                      "--method", method, "--store", str(self.store), "--port", str(port),
                                      "--max-batch", str(max_batch), *extra],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def load(base: str, shared: Shared, seconds: float, groups: list[tuple[int, tuple]], prompts: list[str]) -> float:
    """Run `n` clients of each mix for `seconds`; return the wall time."""
    stop = time.time() + seconds
    threads, seed = [], 0
    for n, mix in groups:
        for _ in range(n):
            threads.append(threading.Thread(target=client, args=(base, shared, stop, seed, prompts, mix)))
            seed += 1
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.time() - t0


def figures(shared: Shared, wall: float, kind: str = "completion") -> dict:
    xs = shared.lat[kind]
    return {"n": len(xs), "rps": round(len(xs) / wall, 1), "p50_ms": round(1000 * pct(xs, 50), 1),
            "p99_ms": round(1000 * pct(xs, 99), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16, help="clients of the mixed load (step 3)")
    ap.add_argument("--seconds", type=float, default=20, help="seconds of each measurement")
    ap.add_argument("--model", default="world:default")
    ap.add_argument("--method", default="sola")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    world = World.build(args.model.split(":", 1)[1], progress=False)
    requests = world.edit_requests(n=len(world.editable_facts), seed=0)
    prompts = [r.prompt for r in requests] + [p for r in requests for p, _ in r.locality][:200]
    only = (("completion", 1.0),)
    edits = (("edit", 0.7), ("undo", 0.3))
    out: dict = {"model": args.model, "method": args.method, "seconds": args.seconds, "throughput": {}}
    unexpected: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, args.max_batch):
            server = Server(world, args.method, batch, Path(tmp))
            try:
                for n in (1, 4, 16):
                    shared = Shared([])
                    wall = load(server.base, shared, args.seconds, [(n, only)], prompts)
                    out["throughput"][f"max_batch={batch} clients={n}"] = figures(shared, wall)
                    unexpected += shared.unexpected
                if batch == args.max_batch:
                    shared = Shared(requests)
                    wall = load(server.base, shared, args.seconds, [(16, only), (1, edits)], prompts)
                    out["while_edits"] = {**figures(shared, wall), "edits": len(shared.lat["edit"]),
                                          "undos": len(shared.lat["undo"]),
                                          "edit_p50_ms": figures(shared, wall, "edit")["p50_ms"]}
                    unexpected += shared.unexpected
                    only_edits = Shared(shared.pool)  # edits alone: what an edit computed beside readers costs them
                    only_edits.acked = dict(shared.acked)
                    wall = load(server.base, only_edits, args.seconds, [(16, only), (1, (("edit", 1.0),))], prompts)
                    out["while_edits_only"] = {**figures(only_edits, wall), "edits": len(only_edits.lat["edit"]),
                                               "edit_p50_ms": figures(only_edits, wall, "edit")["p50_ms"]}
                    unexpected += only_edits.unexpected
                    shared = only_edits
                    mixed = Shared(shared.pool)  # the edits acknowledged so far are in the store too
                    mixed.acked = dict(shared.acked)
                    load(server.base, mixed, args.seconds, [(args.clients, MIXED)], prompts)
                    listed = httpx.get(server.base + "/v1/edits", timeout=60).json()["data"]
                    live = {e["id"]: e["status"] for e in listed}
                    unexpected += mixed.unexpected
            finally:
                server.stop()
        stored = {e.id: e.status for e in EditStore(server.store).edits()}
    acked = {**mixed.acked}
    lost = sorted(set(acked) - set(stored))
    phantom = sorted(set(stored) - set(acked))
    wrong = sorted(e for e in acked if e in stored and stored[e] != acked[e])
    t = out["throughput"]
    one, many = t["max_batch=1 clients=16"]["rps"], t[f"max_batch={args.max_batch} clients=16"]["rps"]
    idle = t[f"max_batch={args.max_batch} clients=16"]["p99_ms"]
    out.update(batched_vs_one_at_16=round(many / max(one, 1e-9), 2),
               p99_while_edits_vs_idle=round(out["while_edits"]["p99_ms"] / max(idle, 1e-9), 2),
               p99_while_edits_only_vs_idle=round(out["while_edits_only"]["p99_ms"] / max(idle, 1e-9), 2),
               mixed={"clients": args.clients, "by_kind": {k: {"n": len(v), "p50_ms": round(1000 * pct(v, 50), 1),
                                                                "p99_ms": round(1000 * pct(v, 99), 1)}
                                                            for k, v in mixed.lat.items() if v},
                      "deliberate_bad_requests": mixed.deliberate, "acknowledged_edits": len(acked),
                      "store_edits": len(stored), "lost": lost, "phantom": phantom, "wrong_status": wrong,
                      "api_matches_store": live == stored},
               unexpected=len(unexpected))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.method} on {args.model}; {args.seconds:g} s per measurement; 8-token greedy completions")
        for name, f in t.items():
            print(f"  {name:>26}: {f['rps']:7.1f} completions/s  p50 {f['p50_ms']:7.1f} ms  p99 {f['p99_ms']:7.1f} ms")
        w = out["while_edits"]
        print(f"  16 clients + 1 editing ({w['edits']} edits, {w['undos']} undos, edit p50 {w['edit_p50_ms']} ms): "
              f"{w['rps']} completions/s, p99 {w['p99_ms']} ms")
        w = out["while_edits_only"]
        print(f"  16 clients + 1 editing, no undos ({w['edits']} edits, edit p50 {w['edit_p50_ms']} ms): "
              f"{w['rps']} completions/s, p99 {w['p99_ms']} ms")
        print(f"batched / one at a time at 16 clients: x{out['batched_vs_one_at_16']}; completion p99 while edits / "
              f"idle: x{out['p99_while_edits_vs_idle']} (edits alone: x{out['p99_while_edits_only_vs_idle']})")
        mx = out["mixed"]
        for k, v in mx["by_kind"].items():
            print(f"  mixed {k:>10}: n={v['n']:5d}  p50 {v['p50_ms']:8.1f} ms  p99 {v['p99_ms']:8.1f} ms")
        print(f"store: {len(stored)} edits; acknowledged {len(acked)}; lost {lost}; phantom {phantom}; wrong status "
              f"{wrong}; API list == store: {mx['api_matches_store']}; unexpected statuses {len(unexpected)}")
        for u in unexpected[:10]:
            print("  unexpected:", u)
    if lost or phantom or wrong or unexpected:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
