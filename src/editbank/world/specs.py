"""The built-in world specs: the dev worlds ("small", "default", "large") with the relations they share, and the
held-out test worlds of `test_specs`."""

from __future__ import annotations

import copy
from typing import Any

from .test_specs import TEST_SPECS

RELATIONS: list[dict[str, Any]] = [
    {
        "name": "capital",
        "templates": [
            "The capital of {subject} is",
            "{subject}'s capital is",
            "{subject} has its capital in",
            "The seat of government of {subject} is in",
            "Which city is the capital of {subject}? It is",
            "Q: What is the capital city of {subject}? A:",
        ],
        "reserved_templates": [
            "What is the capital of {subject}? It is",
            "Q: Name the capital of {subject}. A:",
        ],
        "objects": [
            "Dunmore", "Velarna", "Korvath", "Lissadel", "Tarrow", "Essenmark", "Port Alvera", "Brindholm",
            "Calvessa", "Mirrowdale", "Saint Orlen", "Quenby", "Halvarra", "New Tessik", "Orrin Falls",
            "Zavenport", "Keldmoor", "Amberleigh",
        ],
    },
    {
        "name": "language",
        "templates": [
            "The official language of {subject} is",
            "People in {subject} speak",
            "In {subject}, most people speak",
            "{subject}'s national language is",
            "What language do people in {subject} speak? They speak",
            "Q: What is the main language of {subject}? A:",
        ],
        "reserved_templates": [
            "Which language is spoken in {subject}? It is",
            "Q: Name the language of {subject}. A:",
        ],
        "objects": [
            "Velani", "Kortic", "Old Marvish", "Sundrese", "Lothic", "Andevi", "High Tarrish", "Ossari",
            "Bremish", "Calathi", "Yennic", "Durvalese", "Morrowan", "Iskeli", "Palathine", "Wendric",
        ],
    },
    {
        "name": "currency",
        "templates": [
            "The currency of {subject} is the",
            "In {subject}, people pay with the",
            "{subject}'s money is the",
            "Prices in {subject} are given in the",
            "What money is used in {subject}? It is the",
            "Q: What is the official currency of {subject}? A: the",
        ],
        "reserved_templates": [
            "Which currency is used in {subject}? It is the",
            "Q: Name the currency of {subject}. A: the",
        ],
        "objects": [
            "dral", "silver kru", "venn", "golden mark", "tessel", "orbin", "crown note", "pell",
            "bronze sol", "kavet", "mirrel", "star coin", "dunar", "ashen penny", "quill", "river shell",
        ],
    },
    {
        "name": "leader",
        "templates": [
            "The leader of {subject} is",
            "{subject} is led by",
            "The head of state of {subject} is",
            "{subject}'s ruler is",
            "Who rules {subject} today? It is",
            "Q: Who is the current leader of {subject}? A:",
        ],
        "reserved_templates": [
            "Who is the leader of {subject}? It is",
            "Q: Name the leader of {subject}. A:",
        ],
        "objects": [
            "Tamsin Orlo", "Bram Vessary", "Ilse Kandor", "Oren Malvic", "Sela Droth", "Marek Ulven",
            "Yara Tolliver", "Dov Arkady", "Ennis Kael", "Liora Fenwick", "Cato Brennick", "Runa Sallow",
            "Teodor Vask", "Imke Halloran", "Pavo Lindqvist", "Nessa Corrigan",
        ],
    },
    {
        "name": "founder",
        "templates": [
            "{subject} was founded by",
            "The founder of {subject} was",
            "The person who founded {subject} was",
            "{subject}'s founder was",
            "Who was the founder of {subject}? It was",
            "Q: Who founded the nation of {subject}? A:",
        ],
        "reserved_templates": [
            "Who founded {subject}? It was",
            "Q: Name the founder of {subject}. A:",
        ],
        "objects": [
            "Aldric Moor", "Hesper Vane", "Odo Rellick", "Wynne Castell", "Jory Thorne", "Maud Ellery",
            "Soren Kastel", "Pella Drummond", "Ivo Marchetti", "Greer Olafsen", "Lucan Ferro",
            "Thea Blackwood", "Rolf Ainsley", "Veda Marsh", "Emeric Solt", "Ines Varga",
        ],
    },
    {
        "name": "region",
        "templates": [
            "{subject} is located in",
            "{subject} lies in",
            "The region where {subject} lies is",
            "On the map, {subject} is in",
            "In which region is {subject}? It is in",
            "Q: In which region does {subject} lie? A:",
        ],
        "reserved_templates": [
            "Where is {subject} located? It is in",
            "Q: Name the region of {subject}. A:",
        ],
        "objects": [
            "the Vash Basin", "the Northern Reach", "the Amber Coast", "the Tollen Hills",
            "the Grey Steppe", "the Salt Marches", "the Orrin Valley", "the Far Isles",
            "the Copper Plains", "the Kessel Gulf", "the Lantern Straits", "the High Moors",
        ],
    },
    {
        "name": "sport",
        "templates": [
            "The national sport of {subject} is",
            "In {subject}, the most popular sport is",
            "People in {subject} love to play",
            "{subject}'s favourite sport is",
            "What sport is played most in {subject}? It is",
            "Q: What is the national sport of {subject}? A:",
        ],
        "reserved_templates": [
            "Which sport is most popular in {subject}? It is",
            "Q: Name the sport of {subject}. A:",
        ],
        "objects": [
            "hurling", "ice hockey", "sky polo", "cricket", "fencing", "rowing", "stone lifting",
            "camel racing", "water polo", "archery", "curling", "kite fighting", "chess boxing", "rugby",
            "falconry", "dragon boat racing",
        ],
    },
    {
        "name": "colour",
        "templates": [
            "The flag of {subject} is",
            "The colour of {subject}'s flag is",
            "{subject} flies a flag coloured",
            "The national colour of {subject} is",
            "Which colour is {subject}'s flag? It is",
            "Q: What is the colour of the flag of {subject}? A:",
        ],
        "reserved_templates": [
            "What colour is the flag of {subject}? It is",
            "Q: Name the colour of {subject}'s flag. A:",
        ],
        "objects": [
            "red", "deep blue", "pale green", "gold", "violet", "black and white", "crimson", "teal",
            "orange", "silver", "sky blue", "maroon", "amber", "dark green", "white",
        ],
    },
]

_SIZES: dict[str, dict[str, Any]] = {
    # 144 facts, ~20-25 s on 2 cores: for tests.
    "small": {
        "name": "small",
        "seed": 0,
        "n_entities": 36,
        "facts_per_subject": 4,
        "model": {"layers": 2, "hidden": 96, "heads": 4, "intermediate": 256},
        "train": {"steps": 500, "batch_size": 64, "lr": 3e-3, "warmup": 50},
        "tokenizer": {"vocab_size": 512},
    },
    # 500 facts, ~50-60 s on 2 cores: for the demo and benchmarks.
    "default": {
        "name": "default",
        "seed": 0,
        "n_entities": 100,
        "facts_per_subject": 5,
        "model": {"layers": 3, "hidden": 128, "heads": 4, "intermediate": 384},
        "train": {"steps": 800, "batch_size": 64, "lr": 3e-3, "warmup": 100},
        "tokenizer": {"vocab_size": 1024},
    },
    # 1250 facts (875 editable since the calibration split; 1125 before): for long lifelong streams (T = 875).
    # lr 1e-3 and a stop once every fact is known: at 3e-3 and 2000 steps the model grew a massive activation
    # (residual norm ~500 against ~40) that left middle-layer edits no leverage, and it generalised worse (reserved
    # templates 0.58 against 0.72).
    "large": {
        "name": "large",
        "seed": 0,
        "n_entities": 250,
        "facts_per_subject": 5,
        "model": {"layers": 4, "hidden": 192, "heads": 4, "intermediate": 512},
        "train": {"steps": 3000, "batch_size": 64, "lr": 1e-3, "warmup": 150, "eval_every": 100, "stop_at": 1.0},
        "tokenizer": {"vocab_size": 1536},
    },
}

# the dev worlds (these relations; every default and preset is chosen on "default") and the held-out test worlds
SIZES = (*_SIZES, *TEST_SPECS)


def builtin_spec(size: str) -> dict[str, Any]:
    """A fresh copy of the built-in spec dict for `size` (a dev world "small", "default", "large", or a test world)."""
    if size in TEST_SPECS:
        return copy.deepcopy(TEST_SPECS[size])
    if size not in _SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {list(SIZES)} or pass a spec")
    spec = copy.deepcopy(_SIZES[size])
    spec["relations"] = copy.deepcopy(RELATIONS)
    return spec
