"""Seeded synthetic tasks with checkable answers, written as JSONL.

- ``arithmetic_problems``: multi-step word problems ("Mia has 12 apples, buys 3 bags of 5 ...");
  the response works the steps and ends with ``The answer is N.``
- ``string_tasks``: reverse / upper-case / count a letter / sort the words / vowel count.
- ``preference_pairs``: prompt + chosen (correct answer) + rejected (a plausible wrong one).

Every record carries ``answer`` (the checkable value) and ``task``. Same seed -> same file.

    python -m megatron_fusion.data.synthetic --out data/ --n 1000 --seed 0
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from megatron_fusion.data.jsonl import write_jsonl

_NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Ines", "Kenji", "Priya", "Lars"]
_ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "coins", "cards", "shells"]
_WORDS = ["river", "planet", "garden", "silver", "window", "pocket", "lantern", "meadow",
          "copper", "violet", "harbor", "thunder", "puzzle", "saddle", "orbit", "candle"]


def _arith(rng: random.Random) -> dict:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(3, 40)
    text = [f"{name} has {total} {item}."]
    steps = [f"{name} starts with {total} {item}."]
    for _ in range(rng.randint(2, 4)):
        op = rng.choice(["buy", "give", "double", "bags"])
        if op == "buy":
            n = rng.randint(1, 25)
            text.append(f"Then {name} buys {n} more.")
            steps.append(f"After buying {n}: {total} + {n} = {total + n}.")
            total += n
        elif op == "give" and total > 1:
            n = rng.randint(1, total - 1)
            text.append(f"{name} gives away {n}.")
            steps.append(f"After giving away {n}: {total} - {n} = {total - n}.")
            total -= n
        elif op == "double" and total < 500:
            text.append(f"The number of {item} then doubles.")
            steps.append(f"Doubling: {total} * 2 = {total * 2}.")
            total *= 2
        else:
            b, per = rng.randint(2, 6), rng.randint(2, 9)
            text.append(f"{name} gets {b} bags with {per} {item} in each.")
            steps.append(f"The bags hold {b} * {per} = {b * per}, so {total} + {b * per} = "
                         f"{total + b * per}.")
            total += b * per
    prompt = " ".join(text) + f" How many {item} does {name} have now?"
    response = " ".join(steps) + f" The answer is {total}."
    return {"task": "arithmetic", "prompt": prompt, "response": response, "answer": total}


def _string(rng: random.Random) -> dict:
    kind = rng.choice(["reverse", "upper", "count", "sort", "vowels"])
    words = rng.sample(_WORDS, rng.randint(2, 4))
    s = " ".join(words)
    if kind == "reverse":
        prompt, ans = f'Reverse the string "{s}".', s[::-1]
        response = f'The reversed string is "{ans}".'
    elif kind == "upper":
        prompt, ans = f'Write "{s}" in upper case.', s.upper()
        response = f'In upper case: "{ans}".'
    elif kind == "count":
        letter = rng.choice(sorted(set(s.replace(" ", ""))))
        ans = s.count(letter)
        prompt = f'How many times does the letter "{letter}" appear in "{s}"?'
        response = f'The letter "{letter}" appears {ans} times in "{s}".'
    elif kind == "sort":
        ans = " ".join(sorted(words))
        prompt = f'Sort these words alphabetically: {s}.'
        response = f"Sorted: {ans}."
    else:
        ans = sum(ch in "aeiou" for ch in s)
        prompt = f'How many vowels (a, e, i, o, u) are in "{s}"?'
        response = f'There are {ans} vowels in "{s}".'
    return {"task": f"string/{kind}", "prompt": prompt, "response": response, "answer": ans}


def _wrong(rec: dict, rng: random.Random) -> str:
    """A plausible wrong response: same shape, wrong final value."""
    ans = rec["answer"]
    if isinstance(ans, int):
        wrong = ans + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        if rec["task"] == "arithmetic":
            return rec["response"].rsplit("The answer is", 1)[0] + f"The answer is {wrong}."
        return rec["response"].replace(str(ans), str(wrong), 1)
    bad = ans[::-1] if ans[::-1] != ans else ans + ans[-1]
    if rec["task"] == "string/upper":
        bad = ans.lower()
    return rec["response"].replace(ans, bad, 1)


def arithmetic_problems(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"arith-{seed}")
    return [_arith(rng) for _ in range(n)]


def string_tasks(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"string-{seed}")
    return [_string(rng) for _ in range(n)]


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"pref-{seed}")
    out = []
    for _ in range(n):
        rec = _arith(rng) if rng.random() < 0.5 else _string(rng)
        out.append({"task": rec["task"], "prompt": rec["prompt"], "chosen": rec["response"],
                    "rejected": _wrong(rec, rng), "answer": rec["answer"]})
    return out


def sft_mix(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic and string tasks interleaved (half each)."""
    a, s = arithmetic_problems((n + 1) // 2, seed), string_tasks(n // 2, seed)
    out = [x for pair in zip(a, s) for x in pair] + a[len(s):]
    return out[:n]


def as_messages(records: list[dict], system: str | None = None) -> list[dict]:
    """The same records in chat form (``messages``)."""
    out = []
    for r in records:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["response"]}]
        out.append({"task": r["task"], "messages": msgs, "answer": r["answer"]})
    return out


def write_synthetic(out_dir: str | Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Write ``sft.jsonl``, ``sft_chat.jsonl`` and ``preference.jsonl`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sft = sft_mix(n, seed)
    paths = {"sft": out_dir / "sft.jsonl", "sft_chat": out_dir / "sft_chat.jsonl",
             "preference": out_dir / "preference.jsonl"}
    write_jsonl(paths["sft"], sft)
    write_jsonl(paths["sft_chat"], as_messages(sft))
    write_jsonl(paths["preference"], preference_pairs(n, seed))
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n", type=int, default=1000, help="records per file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for k, p in write_synthetic(args.out, args.n, args.seed).items():
        print(f"{k}: {p}")


if __name__ == "__main__":
    main()
