"""Synthetic tasks with exact answers: seeded generators and checkers for training and evaluation.

Why synthetic: no data can be downloaded here, and a cache policy's effect on *quality* can only be
measured on answers that are checkable exactly. Each task bounds its difficulty and varies prompt and
answer lengths, so that stop tokens and EOS padding matter; `kv_retrieval` has long prompts (up to
~512 tokens), where prompt caching pays off.

Held-out split: an instance belongs to the evaluation split when a hash of its canonical problem key
falls in 1/16 of the hash space; training rejects those instances and evaluation draws only them, so
reported accuracy is on problems the model never saw (it matters for small spaces: 3x2-digit products
have ~10^5 instances and training samples millions).
"""
from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass
from typing import Callable

HELDOUT_MOD = 16
WORDS = ("apple", "river", "stone", "cloud", "tiger", "house", "green", "music", "paper", "light",
         "night", "ocean", "bread", "chair", "dance", "eagle", "flame", "grape", "honey", "island",
         "jacket", "kettle", "lemon", "mango", "needle", "orange", "pencil", "queen", "rabbit", "silver",
         "table", "umbrella", "violin", "window", "yellow", "zebra", "anchor", "bottle", "candle", "dragon",
         "forest", "garden", "hammer", "mirror", "planet", "rocket", "shadow", "tunnel", "valley", "wizard")
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen",
         "Liam", "Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tina", "Umar", "Vera",
         "Walter", "Xena", "Yusuf", "Zoe", "Hannah", "Oscar", "Nina", "Leo")
CITIES = ("Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo",
          "Tokyo", "Seoul", "Cairo", "Lima", "Quito", "Austin", "Boston", "Denver", "Toronto", "Sydney")
JOBS = ("teacher", "doctor", "pilot", "baker", "farmer", "lawyer", "nurse", "painter", "writer", "chef",
        "engineer", "dentist", "plumber", "singer", "driver", "artist", "banker", "builder", "editor", "guide")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    """The user message (the chat template is applied by the caller)."""
    answer: str
    """The exact target response, without stop token."""
    key: str
    """Canonical problem identity (decides the held-out split)."""


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], Example]
    check: Callable[[str, Example], bool]
    gen_length: int
    """Default canvas for evaluation: the longest answer plus the stop token fits in it."""


def is_heldout(key: str) -> bool:
    return zlib.crc32(key.encode()) % HELDOUT_MOD == 0


def _num(rng: random.Random, max_digits: int) -> int:
    """Uniform over the digit count first, so short and long operands are equally common."""
    d = rng.randint(1, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


# -- arithmetic ---------------------------------------------------------------------------------
def column_sum(a: int, b: int) -> list[str]:
    """Worked column addition, least significant column first: '4+8+1=13' (the +1 is the carry)."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return lines


def make_addition(rng: random.Random) -> Example:
    a, b = _num(rng, 5), _num(rng, 5)
    tpl = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a}+{b}."))
    answer = "\n".join(column_sum(a, b) + [f"#### {a + b}"])
    return Example("addition", tpl.format(a=a, b=b), answer, f"add:{a}+{b}")


def make_multiplication(rng: random.Random) -> Example:
    a, b = _num(rng, 3), _num(rng, 2)
    tpl = rng.choice(("What is {a} * {b}?", "Multiply {a} by {b}.", "Compute {a}*{b}."))
    lines = [f"{a}*{b % 10}={a * (b % 10)}"]
    if b >= 10:
        p0, p1 = a * (b % 10), a * (b // 10) * 10
        lines += [f"{a}*{b // 10 * 10}={p1}"] + column_sum(p0, p1)
    answer = "\n".join(lines + [f"#### {a * b}"])
    return Example("multiplication", tpl.format(a=a, b=b), answer, f"mul:{a}*{b}")


def final_number(text: str) -> str | None:
    """GSM8K extraction: the number after '####', else the last number in the text."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    if m is None:
        nums = re.findall(r"-?[\d,]*\.?\d+", text)
        if not nums:
            return None
        s = nums[-1]
    else:
        s = m.group(1)
    s = s.replace(",", "")
    return s[:-2] if s.endswith(".0") else s.rstrip(".")


def check_number(text: str, ex: Example) -> bool:
    return final_number(text) == final_number(ex.answer)


# -- lists --------------------------------------------------------------------------------------
def make_sort(rng: random.Random) -> Example:
    xs = [_num(rng, 3) for _ in range(rng.randint(2, 12))]
    tpl = rng.choice(("Sort these numbers in ascending order: {l}", "Sort ascending: {l}",
                      "Put in increasing order: {l}"))
    return Example("sort", tpl.format(l=", ".join(map(str, xs))), ", ".join(map(str, sorted(xs))),
                   "sort:" + ",".join(map(str, xs)))


def make_reverse(rng: random.Random) -> Example:
    pool = WORDS if rng.random() < 0.7 else [str(i) for i in range(100)]
    xs = [rng.choice(pool) for _ in range(rng.randint(2, 12))]
    tpl = rng.choice(("Reverse this list: {l}", "Reverse the order: {l}", "Write backwards: {l}"))
    return Example("reverse", tpl.format(l=", ".join(xs)), ", ".join(reversed(xs)), "rev:" + ",".join(xs))


def _items(text: str) -> list[str]:
    return [t.strip() for t in text.strip().split(",")]


def check_list(text: str, ex: Example) -> bool:
    return _items(text) == _items(ex.answer)


# -- retrieval ----------------------------------------------------------------------------------
KV_MAX_PAIRS = 50


def make_kv(rng: random.Random, max_pairs: int = KV_MAX_PAIRS, min_pairs: int = 1) -> Example:
    """Up to 50 pairs (at most ~500 prompt tokens); the queried key sits anywhere in the context.
    `min_pairs` / `max_pairs` narrow the pair count for a training curriculum (the defaults draw the
    same random numbers as always, so evaluation sets do not change)."""
    n = rng.randint(min_pairs, max_pairs)
    keys: list[str] = []
    while len(keys) < n:
        k = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))
        if k not in keys:
            keys.append(k)
    vals = [str(_num(rng, 5)) if rng.random() < 0.7 else rng.choice(WORDS) for _ in keys]
    q = rng.randrange(n)
    ctx = "\n".join(f"{k}={v}" for k, v in zip(keys, vals))
    tpl = rng.choice(("Here are some key-value pairs:\n{c}\nWhat is the value of {k}?",
                      "Memorize:\n{c}\nWhat is {k}?", "Key-value store:\n{c}\nLook up {k}."))
    return Example("kv_retrieval", tpl.format(c=ctx, k=keys[q]), vals[q], f"kv:{ctx}|{keys[q]}")


def check_exact(text: str, ex: Example) -> bool:
    return text.strip() == ex.answer.strip()


# -- structured output --------------------------------------------------------------------------
FIELD_ORDER = ("name", "age", "city", "job")
PHRASES = {
    "age": ("{name} is {v} years old.", "Age: {v}."),
    "city": ("{name} lives in {v}.", "City: {v}."),
    "job": ("{name}'s job is {v}.", "Job: {v}."),
}


def make_json(rng: random.Random) -> Example:
    rec: dict[str, object] = {"name": rng.choice(NAMES)}
    fields = [f for f in FIELD_ORDER[1:] if rng.random() < 0.7]
    values = {"age": rng.randint(18, 90), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    for f in FIELD_ORDER[1:]:
        if f in fields:
            rec[f] = values[f]
    sentences = [rng.choice(("The person is called {v}.", "Name: {v}.")).format(v=rec["name"])]
    body = [rng.choice(PHRASES[f]).format(name=rec["name"], v=rec[f]) for f in fields]
    rng.shuffle(body)
    tpl = rng.choice(("Write a JSON record for this person: {d}", "Convert to JSON: {d}",
                      "Describe as JSON with keys {keys}: {d}"))
    desc = " ".join(sentences + body)
    prompt = tpl.format(d=desc, keys=", ".join(rec))
    return Example("json", prompt, json.dumps(rec), "json:" + json.dumps(rec) + "|" + desc)


def check_json(text: str, ex: Example) -> bool:
    try:
        return json.loads(text.strip()) == json.loads(ex.answer)
    except ValueError:
        return False


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("addition", make_addition, check_number, 64),
    Task("multiplication", make_multiplication, check_number, 96),
    Task("sort", make_sort, check_list, 64),
    Task("reverse", make_reverse, check_list, 64),
    Task("kv_retrieval", make_kv, check_exact, 64),
    Task("json", make_json, check_json, 64),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"dataset.name={name!r} is not allowed; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def sample(task: str, rng: random.Random, split: str = "train", **kw) -> Example:
    """One instance of the split ('train' rejects held-out problems, 'test' keeps only those); `kw` go to
    the task's maker (kv_retrieval: min_pairs, max_pairs)."""
    make = get_task(task).make
    want = split == "test"
    while True:
        ex = make(rng, **kw)
        if is_heldout(ex.key) == want:
            return ex


def eval_set(task: str, size: int, seed: int = 0) -> list[Example]:
    """A fixed held-out set: the same (task, size, seed) always gives the same instances."""
    rng = random.Random(f"eval:{task}:{seed}")
    return [sample(task, rng, "test") for _ in range(size)]
