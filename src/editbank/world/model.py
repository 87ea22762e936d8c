"""The world's Llama: config from a ModelSpec, and the generation config for greedy decoding."""

from __future__ import annotations

from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from .spec import ModelSpec


def llama_config(m: ModelSpec, tokenizer) -> LlamaConfig:
    """A small float32 LlamaConfig sized by `m` for `tokenizer`'s vocabulary and special tokens."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden,
        intermediate_size=m.intermediate or 3 * m.hidden,
        num_hidden_layers=m.layers,
        num_attention_heads=m.heads,
        num_key_value_heads=m.kv_heads or m.heads,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=m.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def new_model(m: ModelSpec, tokenizer) -> LlamaForCausalLM:
    """A freshly initialised world model (uses torch's global RNG) with a greedy generation config."""
    model = LlamaForCausalLM(llama_config(m, tokenizer))
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=8,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model
