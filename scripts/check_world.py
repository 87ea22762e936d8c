"""Build (or load from the cache) a world and report greedy exact match on its train/reserved queries."""

from __future__ import annotations

import argparse
import collections
import time

from editbank.world import World
from editbank.world.accuracy import accuracy, generate_flags


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python scripts/check_world.py [--size small|default] [--spec FILE] [--force]`."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="default", choices=["small", "default"])
    ap.add_argument("--spec", help="a world spec JSON file (overrides --size)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--cache-dir", help="cache root (default: $EDITBANK_CACHE or ~/.cache/editbank)")
    ap.add_argument("--seed", type=int, help="override the spec's seed")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--by-template", action="store_true", help="also print accuracy per template")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    world = World.build(args.spec or args.size, cache_dir=args.cache_dir, force=args.force, seed=args.seed)
    took = time.perf_counter() - start
    info = world.info
    print(f"world {world.name!r} at {world.path}")
    print(f"  {len(world.entities)} entities, {len(world.relations)} relations, {len(world.facts)} facts")
    print(
        f"  build time {info.get('seconds', float('nan')):.1f} s (training {info.get('train_seconds', 0):.1f} s, "
        f"{info.get('steps')} steps at {info.get('threads', '?')} thread)"
    )
    print(f"  this call took {took:.1f} s" + (" (cached)" if took < info.get("seconds", 0) / 2 else ""))

    model, tok = world.load_model(), world.load_tokenizer()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  model: {model.config.num_hidden_layers} layers x {model.config.hidden_size} wide, "
          f"{n_params / 1e6:.2f} M parameters, vocab {len(tok)}")
    for split in ("train", "reserved"):
        pairs = world.queries(split)
        t0 = time.perf_counter()
        flags = generate_flags(model, tok, pairs, batch_size=args.batch_size)
        print(f"  {split:8s} greedy exact match {accuracy(flags):7.2%} of {len(pairs)} queries "
              f"({time.perf_counter() - t0:.1f} s)")
        if args.by_template:
            per: dict[str, list[bool]] = collections.defaultdict(list)
            labels = [t for f in world.facts for t in _templates(world, f.relation, split)]
            for label, ok in zip(labels, flags, strict=True):
                per[label].append(ok)
            for label, v in per.items():
                print(f"      {accuracy(v):7.2%}  {label}")
    return 0


def _templates(world: World, relation: str, split: str) -> list[str]:
    rel = world.relation(relation)
    return rel.templates if split == "train" else rel.reserved_templates


if __name__ == "__main__":
    raise SystemExit(main())
