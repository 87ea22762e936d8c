"""GRACE's router: `routes` names the entry its hook applies, for every prompt."""

from __future__ import annotations

import torch

from editbank import Editor
from editbank.models.hooks import trace


def test_routes_names_the_entry_the_hook_applies(small_world, world_requests, tmp_path):
    ed = Editor.open(small_world.path, method="grace", store=tmp_path / "g.db")
    edits = ed.edit(world_requests[:4], check=False)
    m = ed.method
    prompts = [r.prompt for r in world_requests[:4]] + [p for r in world_requests[:4] for p in r.rephrases]
    prompts += [p for r in world_requests[4:8] for p, _ in r.locality]
    owners = m.routes(prompts)
    assert owners[:4] == [e.id for e in edits]
    for p, owner in zip(prompts, owners):
        ids = ed.tokenizer(p, return_tensors="pt")["input_ids"]
        with torch.no_grad(), trace(ed.model, m.path, inputs=False) as tr:
            ed.model(input_ids=ids)
        edited = tr[m.path].output[0, -1]
        with torch.no_grad(), m.disabled(), trace(ed.model, m.path, inputs=False) as tr:
            ed.model(input_ids=ids)
        base = tr[m.path].output[0, -1]
        if owner is None:
            assert torch.equal(edited, base), p
        else:
            assert torch.equal(edited, m.values[m._row(owner), 0].to(edited.dtype)), p
    assert None in owners[4:], "some prompts route to no entry"
    ed.close()
