"""Recipes are untrusted input (docs/recipes.md, "Limits"): parsing stays within fixed bounds of time
and memory whatever a file holds, and every refusal is one line naming the file."""

from __future__ import annotations

import random
import time
import tracemalloc

import pytest

from segprompt.config import load_recipe
from segprompt.config.files import MAX_NODES
from segprompt.errors import SegpromptError

TAGS = ["!!python/object:os.system", "!!python/name:os.system", "!!python/object/apply:os.system", "!!binary",
        "!!timestamp", "!!set", "!!omap", "!!pairs", "!!str", "!!int", "!!float", "!!bool", "!!null", "!!map",
        "!!seq", "!custom", "!<tag:example.com,2000:x>"]


def alias_bomb(levels: int, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel: {{backbone: *a{levels - 1}}}\n"


def random_yaml(rng: random.Random) -> str:
    """One random document: anchors and aliases (forward, backward, recursive), deep flow and block
    nesting, long scalars and keys, every tag, merge keys, and random bytes of YAML syntax."""
    kind = rng.randrange(7)
    if kind == 0:
        return alias_bomb(rng.randint(2, 12), rng.randint(2, 12))
    if kind == 1:
        n = rng.choice([10, 150, 300, 3000, 20000])
        return "model: " + rng.choice(["[", "{a: "]) * n + "1" + rng.choice(["]", "}"]) * n + "\n"
    if kind == 2:
        return "model:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, rng.choice([5, 100, 400])))
    if kind == 3:
        return f"model: {{backbone: {{name: resnet, depth: {'9' * rng.choice([10, 10_000, 500_000])}}}}}\n"
    if kind == 4:
        return f"model: {rng.choice(TAGS)} {rng.choice(['x', '[1, 2]', '{a: 1}', 'ls'])}\n"
    if kind == 5:
        return rng.choice(["a: &x [1, *x]\n", "a: *nothing\n", "<<: *x\n", "a: &x {<<: *x}\n",
                           "b: &x [&y [*y]]\n", "model: &m {backbone: *m}\n"])
    return "".join(rng.choice("[]{}&*!:,-?|>'\"#%@` \n\tab01") for _ in range(rng.randint(1, 400)))


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9))  # 10^9 nodes expanded; once took minutes and gigabytes
    start = time.perf_counter()
    with pytest.raises(SegpromptError, match=rf"recipe '{path}' is refused: it expands to more than {MAX_NODES:,}"):
        load_recipe(path)
    assert time.perf_counter() - start < 2
    path.write_text(alias_bomb(4, 5))  # 5^4 = 625 leaves: aliases within bounds still work
    with pytest.raises(SegpromptError) as e:
        load_recipe(path)
    assert "unknown key" in str(e.value)  # refused later, for its content (a0 is no section)


def test_random_documents_stay_bounded_and_fail_in_one_line(tmp_path):
    load_recipe("smoke")  # imports the model modules once: their import is not the parser's cost
    rng = random.Random(0)
    path = tmp_path / "r.yaml"
    for case in range(140):
        text = random_yaml(rng)
        path.write_text(text)
        start = time.perf_counter()
        try:
            load_recipe(path)
        except SegpromptError as e:
            assert "\n" not in str(e) and str(path) in str(e) and len(str(e)) < 2000, (case, text[:200], str(e))
        seconds = time.perf_counter() - start
        tracemalloc.start()  # a second pass for the memory peak (tracemalloc slows Python down a lot)
        try:
            load_recipe(path)
        except SegpromptError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < 2 and peak < 100 * 2 ** 20, (case, text[:200], seconds, peak)
