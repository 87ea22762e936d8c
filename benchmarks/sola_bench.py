"""SoLA speed and storage, measured in one run: seconds per edit, bytes per edit, forward-latency ratio.

1. `--edits` real sequential edits on the world (a store in a temporary folder): median seconds per edit and
   bytes of storage per edit (growth of the SQLite file, and the artifacts alone).
2. Forward latency of the edited model against the base model (SoLA's hooks removed) for banks of
   `--banks` edits, at each `--batch` size. Banks beyond the real edits are filled with synthetic entries
   (random keys in the standardized key space and copies of trained LoRAs): latency depends on the bank's
   size, not on what its LoRAs say. Half of each timed batch routes to an edit, half routes to none.
   `--model llama-HIDDENxLAYERS` times a random Llama of that size instead of the world's model (with the
   world's tokenizer), to see the ratio at a size where the model, not the bank, dominates.

Each configuration of `--configs` (`;`-separated sets of `key=value` SoLA hyperparameters; `default` is the
defaults) is measured in the same run, so their ratios compare: by default the current defaults against the
previous ones (`key=last,whitening=pca,gate=none`) and the defaults without the subject gate (`gate=none`).

    python benchmarks/sola_bench.py --device cpu
    python benchmarks/sola_bench.py --device cuda --model llama-1024x8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import parse_hp

from editbank import Editor
from editbank.tokens import make_batch
from editbank.world import World


def random_llama(spec: str, vocab: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (int(x) for x in spec.removeprefix("llama-").split("x"))
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or hidden * 2,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).eval()


def fill_bank(method, n: int, routed_keys: torch.Tensor, spread: torch.Tensor, lora_pool: list,
              subjects: list[str]) -> None:
    """Make the bank hold exactly n entries: the keys of the routed prompts first (with their subjects), then random
    keys (per dimension: the corpus keys' mean and spread) with made-up subjects, so a subject gate holds n."""
    bank = method.bank
    for eid in list(bank.slot_of):
        bank.remove(eid)
    bank.clear()
    method.subjects = {10**9 + i: subjects[i] if i < len(subjects) else f"Vorlander{i}" for i in range(n)}
    method._gate_cache = None
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        if i < len(routed_keys):
            key = routed_keys[i]
        else:
            key = bank.center + spread * torch.randn(bank.key_dim, generator=g).to(bank.device)
        A, B = lora_pool[i % len(lora_pool)]
        bank.add(10**9 + i, key, A, B, active=True)


def time_pair(fn, method, repeats: int) -> tuple[float, float]:
    """Median seconds of fn() without and with the method's hooks, interleaved so drift hits both alike."""
    base, edited = [], []
    for _ in range(3):  # warm-up
        fn()
    for _ in range(repeats):
        for hooked, times in ((False, base), (True, edited)):
            method.attach() if hooked else method.detach()
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times.append(time.perf_counter() - t0)
    method.attach()
    return statistics.median(base), statistics.median(edited)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="default", help="world size for the real edits")
    ap.add_argument("--edits", type=int, default=100, help="real sequential edits (seconds and bytes per edit)")
    ap.add_argument("--banks", default="1,100,1000,10000")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="world", help="'world' or llama-HIDDENxLAYERS (random) for the latency part")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--configs", default="default;gate=none;key=last,whitening=pca,gate=none",
                    help="';'-separated SoLA hyperparameter sets (k=v,k=v; 'default': the defaults)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = World.build(args.size, progress=True)
    for config in args.configs.split(";"):
        hp = {} if config.strip() == "default" else parse_hp([x for x in config.split(",") if x])
        out = measure(world, hp, args)
        out["config"] = config
        if args.json:
            print(json.dumps(out))
            continue
        print(f"config {config}: device {args.device}, {out['threads']} threads; real edits on the {args.size} "
              f"world: {out['edits']}")
        print(f"median seconds per edit: {out['median_seconds_per_edit']:.4f}")
        print(f"storage per edit: {out['store_bytes_per_edit']:.0f} bytes (store file), "
              f"{out['artifact_bytes_per_edit']:.0f} bytes (artifacts)")
        print(f"forward latency, model {args.model} (edited / base, median of {args.repeats}):")
        print(f"{'batch':>6} {'edits':>7} {'base ms':>9} {'edited ms':>10} {'ratio':>7}")
        for r in out["latency"]:
            print(f"{r['batch']:6d} {r['bank']:7d} {r['base_ms']:9.3f} {r['edited_ms']:10.3f} {r['ratio']:7.3f}")


def measure(world, hp: dict, args) -> dict:
    banks = [int(x) for x in args.banks.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    out: dict = {"device": args.device, "threads": torch.get_num_threads(), "model": args.model, "hparams": hp}

    # 1. real edits: seconds and bytes per edit
    requests = world.edit_requests(min(args.edits, len(world.editable_facts)), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "edits.db"
        ed = Editor.open(world, method="sola", store=store, device=args.device, **hp)
        ed.edit(requests[0], check=False)  # calibration happens here; not counted
        ed.store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size0 = store.stat().st_size
        for r in requests[1:]:
            ed.edit(r, check=False)
        ed.store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        n = len(requests) - 1
        seconds = [e.stats["seconds"] for e in ed.edits()[1:]]
        art = ed.store._db.execute("SELECT SUM(LENGTH(data)) FROM artifacts").fetchone()[0] / len(requests)
        out.update(edits=len(requests), median_seconds_per_edit=statistics.median(seconds),
                   store_bytes_per_edit=(store.stat().st_size - size0) / n, artifact_bytes_per_edit=art,
                   alpha=ed.method.alpha)
        pool = [ed.method.bank.lora(e.id)[1:] for e in ed.edits()]
        ed.close()

    # 2. latency ratio against the base model
    if args.model == "world":
        ed = Editor.open(world, method="sola", device=args.device, **hp)
    else:
        tok = world.load_tokenizer()
        model = random_llama(args.model, len(tok), args.device)
        ed = Editor(model, tok, method="sola", corpus=world.fact_prompts(),
                    paraphrases=world.calibration_paraphrases(), **hp)
    ed.method.calibrate()
    m = ed.method
    if args.model != "world":  # random model: random LoRAs of its shapes
        pool = [([torch.randn(m.hparams.rank, i) * 0.01 for _, i in m.bank.shapes],
                 [torch.randn(o, m.hparams.rank) * 0.01 for o, _ in m.bank.shapes]) for _ in range(8)]
    spread = torch.stack([m.key_of(p) for p in world.fact_prompts()[:200]]).std(dim=0)
    routed_prompts = [r.prompt for r in requests]
    probes = [p for r in requests for p, _ in r.locality]
    rows = []
    for bsz in batches:
        half = max(1, bsz // 2)
        prompts = routed_prompts[:half] + probes[: bsz - half] if bsz > 1 else routed_prompts[:1]
        batch = make_batch(ed.tokenizer, [(p, " x") for p in prompts], device=ed.device)
        routed_keys = torch.stack([m.key_of(p) for p in routed_prompts[:half]])
        ids, mask, q = batch.input_ids, batch.attention_mask, batch.query_index

        def forward(ids=ids, mask=mask, q=q):
            ed.logits(ids, mask, q)

        for size in banks:
            fill_bank(m, size, routed_keys, spread, pool, [r.subject for r in requests[:half]])
            t_base, t_edit = time_pair(forward, m, args.repeats)  # base: the same call without SoLA's hooks
            rows.append({"batch": bsz, "bank": size, "base_ms": 1e3 * t_base, "edited_ms": 1e3 * t_edit,
                         "ratio": t_edit / t_base})
    ed.close()
    out["latency"] = rows
    return out


if __name__ == "__main__":
    main()
