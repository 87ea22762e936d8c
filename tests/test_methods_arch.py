"""Table-driven: every method x every registry architecture, on tiny random models built from configs.

One single-token edit must change the answer to the target, leave an unrelated prompt's logits alone
(for routing methods), and undo must restore the exact pre-edit logits.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_TYPES, tiny_model, tiny_tokenizer

from editbank import Editor, EditRequest
from editbank.tokens import make_batch, target_ids

# random models' hidden states are dominated by position, so SoLA's sampled calibration rightly warns on some
pytestmark = pytest.mark.filterwarnings("ignore:calibrated alpha:UserWarning")

# per case: the method and hyperparameters that let it write a fact into a random (untrained) tiny model
LOCATE_TINY = {"fact_token": "last", "clamp_norm_factor": 50.0, "v_weight_decay": 0.0, "kl_factor": 0.0,
               "v_num_grad_steps": 50, "v_stop_loss": 0.5, "n_prefixes": 0}
METHOD_HPARAMS = {
    "grace": ("grace", {"eps_init": 1e-3, "n_iter": 50}),
    "grace_shared": ("grace", {"eps_init": 1e-3, "n_iter": 50, "value_mode": "shared"}),
    "ft": ("ft", {"lr": 0.05, "norm_constraint": 1.0, "n_iter": 50}),
    "sola": ("sola", {}),
    "wise": ("wise", {"n_iter": 40}),
    "repair": ("repair", {"n_iter": 40}),
    "rome": ("rome", LOCATE_TINY),
    "memit": ("memit", {**LOCATE_TINY, "mom2_update_weight": 0.1}),
    "alphaedit": ("alphaedit", {**LOCATE_TINY, "L2": 0.1, "nullspace_threshold": 0.5}),
    "metake": ("metake", {**LOCATE_TINY, "L2": 0.1, "nullspace_threshold": 0.5}),
}
# locate-then-edit undo subtracts the newest write (W + ΔW − ΔW): equal up to float rounding, not bit for bit
UNDO_ATOL = {"rome": 1e-5, "memit": 1e-5, "alphaedit": 1e-5, "metake": 1e-5}
ROUTED = {"grace", "grace_shared", "sola"}  # cases that leave unrouted prompts bit-identical

PROMPT, OTHER = "The capital of Arvelia is", "Norland was born in"
SUBJECT = "Arvelia"  # of PROMPT (methods that need one read it; the others ignore it)
CASES = [(m, t) for m in METHOD_HPARAMS for t in TINY_TYPES]


def next_token_logits(ed: Editor, prompt: str) -> torch.Tensor:
    b = make_batch(ed.tokenizer, [(prompt, " x")])
    return ed.logits(b.input_ids, b.attention_mask, b.query_index)[0, b.prompt_len[0] - 1]


def single_token_words(tok) -> list[str]:
    words = {tok.decode([i]).strip() for i in range(len(tok))}
    return [f" {w}" for w in sorted(words) if w.isalpha() and len(target_ids(tok, f" {w}")) == 1]


def runner_up_word(tok, logits: torch.Tensor) -> str:
    """The most likely single-token word that is not already the answer: random tiny models have
    near-flat logits, so a nearby target keeps the case about the method, not about the init."""
    top = logits.argmax().item()
    return max(single_token_words(tok), key=lambda w: logits[target_ids(tok, w)[0]].item()
               if target_ids(tok, w)[0] != top else float("-inf"))


def tiny_editor(method: str, model_type: str, dtype: torch.dtype | None = None) -> tuple[Editor, object]:
    """An editor of table case `method` on a fresh tiny random model, and its tokenizer."""
    tok = tiny_tokenizer()
    model = tiny_model(model_type, len(tok))
    if dtype is not None:
        model = model.to(dtype)
    name, hparams = METHOD_HPARAMS[method]
    return Editor(model, tok, method=name, **hparams), tok


@pytest.mark.parametrize("method, model_type", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_edit_and_undo(method, model_type):
    ed, tok = tiny_editor(method, model_type)
    before, other_before = next_token_logits(ed, PROMPT), next_token_logits(ed, OTHER)
    target = runner_up_word(tok, before)
    e = ed.edit(EditRequest(prompt=PROMPT, target=target, subject=SUBJECT))
    after = next_token_logits(ed, PROMPT)
    assert after.argmax().item() == target_ids(tok, target)[0], "the edit must change the answer"
    if method in ROUTED:
        assert torch.equal(next_token_logits(ed, OTHER), other_before)
    ed.undo(e.id)
    atol = UNDO_ATOL.get(method, 0.0)
    torch.testing.assert_close(next_token_logits(ed, PROMPT), before, rtol=0, atol=atol)  # undo restores the logits
    torch.testing.assert_close(next_token_logits(ed, OTHER), other_before, rtol=0, atol=atol)
    ed.close()


@pytest.mark.parametrize("method", sorted(METHOD_HPARAMS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_edit_and_undo(method, dtype):
    ed, tok = tiny_editor(method, "llama", dtype)
    before = next_token_logits(ed, PROMPT)
    target = runner_up_word(tok, before)
    e = ed.edit(EditRequest(prompt=PROMPT, target=target, subject=SUBJECT))
    assert next_token_logits(ed, PROMPT).argmax().item() == target_ids(tok, target)[0]
    ed.undo(e.id)
    assert torch.equal(next_token_logits(ed, PROMPT), before)


# WISE/REPAIR decide per sample too, but with no corpus to train against, a random model's unrelated prompt may
# clear their activation threshold, so only rows alone vs together are compared for them
ROUTED_CASES = [(m, t) for m in sorted(ROUTED | {"wise", "repair"}) for t in TINY_TYPES]


@pytest.mark.parametrize("method, model_type", ROUTED_CASES, ids=[f"{m}-{t}" for m, t in ROUTED_CASES])
def test_mixed_batch_equals_rows_alone(method, model_type):
    """Rows routed to different edits and rows routed to none, in one padded batch, match each row alone."""
    ed, tok = tiny_editor(method, model_type)
    prompts = [PROMPT, OTHER, "The river that flows through Kestrel is called"]
    for p in prompts[:2]:
        ed.edit(EditRequest(prompt=p, target=runner_up_word(tok, next_token_logits(ed, p))))
    rows = [(prompts[2], " x"), (PROMPT, " a"), (OTHER, " b c")]
    b = make_batch(tok, rows)
    together = ed.logits(b.input_ids, b.attention_mask, b.query_index)
    for i, row in enumerate(rows):
        one = make_batch(tok, [row])
        alone = ed.logits(one.input_ids, one.attention_mask, one.query_index)[0]
        torch.testing.assert_close(together[i, : alone.shape[0]], alone, rtol=1e-4, atol=1e-4)
        assert torch.equal(together[i, b.prompt_len[i] - 1].argmax(), alone[b.prompt_len[i] - 1].argmax())
    if method not in ROUTED:
        ed.close()
        return
    with ed.unedited():
        base = ed.logits(b.input_ids, b.attention_mask, b.query_index)
    assert torch.equal(together[0], base[0]), "the unrouted row is the base model's"
    for i in (1, 2):  # the routed rows answer their own edits
        q = b.prompt_len[i] - 1
        assert together[i, q].argmax() != base[i, q].argmax()
    ed.close()


def test_every_registered_method_is_in_the_grid():
    from editbank.methods import METHODS

    shipped = {name for name, cls in METHODS.items() if cls.__module__.startswith("editbank.")}  # not tests' own
    assert {name for name, _ in METHOD_HPARAMS.values()} == shipped


@pytest.mark.parametrize("method", sorted(METHOD_HPARAMS))
def test_close_gives_the_model_back_as_it_came(method):
    ed, tok = tiny_editor(method, "llama")
    model = ed.model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ed.edit(EditRequest(prompt=PROMPT, target=runner_up_word(tok, next_token_logits(ed, PROMPT)), subject=SUBJECT),
            check=False)
    ed.close()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items()), "base weights restored"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "no hooks left"
    assert "save_pretrained" not in vars(model)
