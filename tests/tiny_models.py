"""Tiny random models and a tiny trained tokenizer, built in-process for tests (no downloads)."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

TINY_TYPES: list[str] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "gpt2",
    "gptj",
    "gpt_neox",
]

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # trained first, so ids 0, 1, 2, 3
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

_SUBJECTS = "Arvelia Dunmore Kestrel Norland Quillon Brightwater Tamsin Orlow Verity Halbrook".split()
_RELATIONS = [
    "The capital of {} is",
    "The CEO of {} is",
    "{} was born in",
    "The official language of {} is",
    "{} is located in the north of",
    "The river that flows through {} is called",
]
_FILLER = (
    "a quiet city with old stone bridges, green parks and a busy harbour where ships arrive every "
    "morning from distant islands and merchants sell fish, bread, wool and copper tools"
).split()


def _corpus() -> list[str]:
    """A few hundred words of deterministic English-like text."""
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j, rel in enumerate(_RELATIONS):
            other = _SUBJECTS[(i + j + 1) % len(_SUBJECTS)]
            words = " ".join(_FILLER[(i * 3 + j) % 7 :][:8])
            lines.append(f"{rel.format(subject)} {other}. It is {words}.")
    return lines


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocab ~400) with <bos>/<eos>/<pad>/<unk>; adds <bos> like Llama tokenizers.

    Shared (cached): tests must not mutate it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _config_kwargs(model_type: str, vocab_size: int) -> dict:
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    if model_type == "gpt2":
        kw.update(n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    elif model_type == "gptj":
        kw.update(n_inner=64, rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif model_type in ("gemma2", "gemma3_text"):
        kw.update(query_pre_attn_scalar=8, sliding_window=16)
    return kw


def _gemma3_config(vocab_size: int) -> AutoConfig:
    """Multimodal Gemma 3 with a 1-layer 28x28 SigLIP tower; image token ids lie outside the text vocab."""
    text = {**_config_kwargs("gemma3_text", vocab_size), "tie_word_embeddings": True}
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    return AutoConfig.for_model(
        "gemma3",
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=vocab_size,
        eoi_token_index=vocab_size + 1,
        image_token_index=vocab_size + 2,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def tiny_model(model_type: str, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A random 4-layer, width-32 float32 causal LM of `model_type` in eval mode, deterministic in seed."""
    if model_type == "gemma3":
        config = _gemma3_config(vocab_size)
    else:
        config = AutoConfig.for_model(model_type, **_config_kwargs(model_type, vocab_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()
