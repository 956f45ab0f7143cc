"""A synthetic chat dataset the project generates itself: deterministic, learnable, with a realistic length mix.

Each record is `{"id": str, "messages": [{"role": "user"|"assistant", "content": str}, ...]}` (the schema of the
shared chat datasets). Record `i` depends only on `(seed, i)`, so the first n records of a larger set are the n
records of a smaller one, and every process that asks for the same records gets the same bytes.

Learnable on purpose: the assistant's answers are templates filled from the question (arithmetic, counting,
repeating words) or from fixed tables (each animal's habitat, food and colour never change), so even a tiny random
model's loss falls quickly; stories add varied, longer text.

Length mix: the target length of a conversation (in word pieces, close to tokens under the preset tokenizer) is
drawn from a lognormal with median 160 and sigma 0.65, clipped to [20, 1000]; exchanges share it unevenly and
stories overshoot a little, so the measured mix under the preset tokenizer is about mean 185, median 150, p90 365,
p99 660, max ~1300 tokens: close to the shared datasets under the Qwen3 template (mean 177-198, median 140-182,
p90 289-380, p99 404-686, max 550-951). About 45% of conversations are multi-turn (2 to 6 exchanges, like
hh_rlhf), the rest single-turn.
"""

from __future__ import annotations

import math
import random
import re

__all__ = [
    "ANIMALS",
    "LENGTH_MEDIAN",
    "LENGTH_SIGMA",
    "MAX_TARGET_LENGTH",
    "MIN_TARGET_LENGTH",
    "PIECE_PATTERN",
    "animal_facts",
    "estimate_tokens",
    "synthetic_chat_records",
]

LENGTH_MEDIAN = 160
LENGTH_SIGMA = 0.65
MIN_TARGET_LENGTH = 20
MAX_TARGET_LENGTH = 1000
MULTI_TURN_FRACTION = 0.45
TURN_OVERHEAD = 5  # <|im_start|> role \n ... <|im_end|> \n: tokens the template adds around a message

ANIMALS = (
    "cat", "dog", "fox", "owl", "bear", "wolf", "deer", "frog", "duck", "goat", "horse", "mouse", "tiger", "lion",
    "rabbit", "turtle", "otter", "eagle", "whale", "shark", "panda", "koala", "zebra", "camel", "snake", "crow",
    "bee", "seal", "crab", "hawk",
)
PLACES = (
    "forest", "river", "mountain", "village", "garden", "desert", "lake", "meadow", "castle", "market", "island",
    "cave", "valley", "farm", "harbor", "library",
)
FOODS = ("berries", "fish", "seeds", "grass", "honey", "apples", "nuts", "leaves", "bread", "carrots", "corn", "rice")
COLORS = ("red", "blue", "green", "brown", "gray", "white", "black", "golden", "orange", "silver")
NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Rex", "Sara", "Tom", "Uma")
VERBS = ("play", "read", "sing", "dance", "fish", "paint", "cook", "swim", "climb", "build", "explore", "rest",
         "run", "draw", "dig", "sail")
ADJECTIVES = ("happy", "tiny", "brave", "quiet", "clever", "sleepy", "kind", "curious", "old", "young", "shy", "fast")
WORDS = ANIMALS + PLACES + FOODS + COLORS + VERBS + ADJECTIVES
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# The GPT-2 pre-tokenizer pattern (letters, digits, other symbols, whitespace), for ASCII text.
PIECE_PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")


def estimate_tokens(text: str) -> int:
    """Word pieces of `text` under the GPT-2 pre-tokenizer pattern: about its token count under the preset tokenizer."""
    return len(PIECE_PATTERN.findall(text))


def animal_facts(animal: str) -> tuple[str, str, str]:
    """The fixed (habitat, food, colour) of an animal: the same in every record, so a model can memorise them."""
    i = ANIMALS.index(animal)
    return PLACES[(5 * i + 1) % len(PLACES)], FOODS[(7 * i + 2) % len(FOODS)], COLORS[(3 * i) % len(COLORS)]


def _fact_card(animal: str) -> str:
    habitat, food, color = animal_facts(animal)
    return f"The {animal} lives in the {habitat}. The {animal} eats {food}. The {animal} is {color}."


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


# Each task returns (user, assistant) of roughly `budget` word pieces in total (at least its minimum size).


def _task_add(rng: random.Random, budget: int) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _task_facts(rng: random.Random, budget: int) -> tuple[str, str]:
    k = max(1, min(len(ANIMALS), round((budget - 6) / 20)))
    animals = rng.sample(ANIMALS, k)
    question = "Tell me about the " + _join(animals) + "." if k > 1 else f"Tell me about the {animals[0]}."
    return question, " ".join(_fact_card(a) for a in animals)


def _task_copy(rng: random.Random, budget: int) -> tuple[str, str]:
    k = max(2, min(300, (budget - 10) // 2))
    words = " ".join(rng.choice(WORDS) for _ in range(k))
    return f"Repeat after me: {words}", f"You said: {words}"


def _task_count(rng: random.Random, budget: int) -> tuple[str, str]:
    k = max(3, min(150, (budget - 10) // 2))
    start = rng.randrange(0, 100)
    numbers = [str(n) for n in range(start, start + k)]
    return f"Count from {numbers[0]} to {numbers[-1]}.", ", ".join(numbers) + "."


def _task_spell(rng: random.Random, budget: int) -> tuple[str, str]:
    n = rng.randrange(len(NUMBER_WORDS))
    return f"How do you write {n} in words?", f"The number {n} is written as {NUMBER_WORDS[n]}."


_STORY_SENTENCES = (
    "Every morning, {name} went to the {place} to {verb}.",
    "One day, {name} met a {adj} {animal2} who liked to {verb2}.",
    "The {animal2} said: let us {verb2} together near the {place2}.",
    "{name} was {adj} and ate some {food}.",
    "In the evening, {name} and the {animal2} went back to the {place}.",
    "{name} liked to {verb} with friends in the {place2}.",
    "The sky over the {place} was {color} and the air was quiet.",
    "{name} found {number} {food} under a {color} tree.",
)


def _task_story(rng: random.Random, budget: int) -> tuple[str, str]:
    name, animal = rng.choice(NAMES), rng.choice(ANIMALS)
    place = rng.choice(PLACES)
    sentences = [f"Once upon a time, {name} the {animal} lived near the {place}."]
    used = estimate_tokens(sentences[0]) + 16
    while used < budget:
        template = rng.choice(_STORY_SENTENCES)
        sentence = template.format(
            name=name, place=place, verb=rng.choice(VERBS), adj=rng.choice(ADJECTIVES), animal2=rng.choice(ANIMALS),
            verb2=rng.choice(VERBS), place2=rng.choice(PLACES), food=rng.choice(FOODS), color=rng.choice(COLORS),
            number=rng.choice(NUMBER_WORDS[2:]),
        )
        sentences.append(sentence)
        used += estimate_tokens(sentence) + 1
    sentences.append("The end.")
    paragraphs, step = [], 4
    for i in range(0, len(sentences), step):
        paragraphs.append(" ".join(sentences[i:i + step]))
    return f"Write a story about {name} the {animal}.", "\n\n".join(paragraphs)


_SHORT_TASKS = (_task_add, _task_spell, _task_facts)
_LONG_TASKS = (_task_facts, _task_copy, _task_count, _task_story, _task_story)


def _exchange(rng: random.Random, budget: int) -> tuple[str, str]:
    if budget < 35:
        return rng.choice(_SHORT_TASKS)(rng, budget)
    return rng.choice(_LONG_TASKS)(rng, budget)


def _target_length(rng: random.Random) -> int:
    raw = math.exp(math.log(LENGTH_MEDIAN) + LENGTH_SIGMA * rng.gauss(0.0, 1.0))
    return int(min(MAX_TARGET_LENGTH, max(MIN_TARGET_LENGTH, round(raw))))


def _record(seed: int, index: int) -> dict:
    # A string seed is hashed with SHA-512 by `random.seed`: independent of PYTHONHASHSEED and of other records.
    rng = random.Random(f"opensloth-synthetic:{seed}:{index}")
    target = _target_length(rng)
    turns = 1
    if target >= 60 and rng.random() < MULTI_TURN_FRACTION / 0.92:  # ~92% of targets are >= 60
        turns = min(6, 2 + int(rng.expovariate(0.7)), target // 30)
    budget = target / turns - 2 * TURN_OVERHEAD
    messages = []
    for _ in range(turns):
        # Spread the budget unevenly over the exchanges, as real chats do.
        share = max(8, int(budget * rng.uniform(0.6, 1.4)))
        user, assistant = _exchange(rng, share)
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return {"id": f"synthetic-{seed}-{index}", "messages": messages}


def synthetic_chat_records(n: int, seed: int = 0, *, start: int = 0) -> list[dict]:
    """`n` synthetic chat records (records `start` .. `start + n - 1` of the stream for `seed`).

    Deterministic: the same `(seed, index)` always gives the same record, in any process. Use disjoint `start`
    ranges for train and evaluation splits.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer (the number of records)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start={start!r} must be a non-negative integer")
    return [_record(seed, i) for i in range(start, start + n)]
