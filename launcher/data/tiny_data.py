"""The shipped preference (DPO), classification and sentiment sets.

Both are derived from the tiny instruction tasks (``tiny.dataset_rows``), so
they share its train/eval separation. A preference pair's prompt is the
instruction in the alpaca template; the chosen response is the right answer,
the rejected one a typical mistake (the word not reversed, the text left in
lowercase, the letters unsorted, a sum off by a little, another capital). A
classification row is the instruction (and input) labelled with its task.

The sentiment set is short product and place reviews labelled ``negative`` or
``positive``, from templates over opinion words, with negations ("was not
great") and contrasts ("X, but Y": the clause after "but" decides) so that a
bag of words alone does not solve it. It is the data of the MiniLM
"BERT for sentiment" recipe.

The capitals set asks for the capital of each made-up country of the tiny
tasks' table (``tiny.CAPITALS``): train rows in four phrasings, eval rows in a
fifth that no train row uses, so exact match on eval rises only when the model
has learned the table rather than the strings. Every answer is one to three
tokens of the tiny tokenizer, so the 4-layer tiny Llama reaches exact match
within a couple hundred CPU steps.

The same questions, in the alpaca prompt with the capital as the reference answer, are the
``prompt`` rows of the GRPO recipe (``capitals/prompts_{train,eval}.jsonl``); the preference pairs' prompts
with the chosen response as the answer are those of the RLHF recipe (``preference/prompts_{train,eval}.jsonl``),
whose reward is the reward model trained on the pairs themselves.

Regenerate the committed files with
``python -m tunefleet.launcher.data.tiny_data recipes/tiny/data``.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path

from tunefleet.launcher.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from tunefleet.launcher.model.tiny import CAPITALS, dataset_rows

TASK_LABELS = ("reverse", "uppercase", "sort", "add", "capital")
_TASK_BY_FIRST_WORD = {"Reverse": "reverse", "Uppercase": "uppercase", "Sort": "sort", "Add": "add"}
_SIZES = {"train": (1000, 600), "eval": (100, 100)}  # (preference pairs, classification rows)
_SENTIMENT_SIZES = {"train": 800, "eval": 200}
# After a space most countries are one token (" Veloria"), at the start of a line two ("V", "eloria"):
# the held-out phrasing puts the country after a space, as three of the four train phrasings do.
_CAPITAL_QUESTIONS = {
    "train": ("What is the capital of {country}?", "Name the capital city of {country}.",
              "Which city is the capital of {country}?", "{country} has which capital?"),
    "eval": ("Tell me the capital of {country}.",),
}
_SUBJECTS = ("the hotel", "this phone", "the pasta", "our guide", "the battery", "the concert", "this jacket",
             "the service", "the app", "the museum", "this blender", "the train ride", "the coffee", "the film",
             "the staff", "this keyboard", "the room", "the book", "the delivery", "the lesson")
_POSITIVE = ("great", "wonderful", "excellent", "lovely", "superb", "delightful", "reliable", "fantastic",
             "pleasant", "impressive")
_NEGATIVE = ("terrible", "awful", "disappointing", "poor", "dreadful", "broken", "boring", "rude", "useless",
             "horrible")


def task_of(row: dict) -> str:
    return _TASK_BY_FIRST_WORD.get(row["instruction"].split()[0], "capital")


def _mistake(row: dict, rng: random.Random, capitals: list[str]) -> str:
    task, answer = task_of(row), row["output"]
    if task in ("reverse", "uppercase"):
        return row["input"]
    if task == "sort":
        return row["input"] if row["input"] != answer else answer[::-1]
    if task == "add":
        return str(int(answer) + rng.choice((1, 2, 10)) * (1 if int(answer) < 10 else rng.choice((-1, 1))))
    return rng.choice([capital for capital in capitals if capital != answer])


def preference_rows(rows: list[dict], rng: random.Random, capitals: list[str]) -> list[dict]:
    out = []
    for row in rows:
        template = ALPACA_PROMPT_WITH_INPUT if row["input"] else ALPACA_PROMPT
        prompt = template.format(instruction=row["instruction"], input=row["input"])
        out.append({"prompt": prompt, "chosen": row["output"], "rejected": _mistake(row, rng, capitals)})
    return out


def classification_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    for row in rows:
        writer.writerow([f"{row['instruction']} {row['input']}".strip(), task_of(row)])
    return buffer.getvalue()


def _clause(rng: random.Random, positive: bool) -> str:
    """A clause with this polarity: an opinion word, or the opposite word negated."""
    if rng.random() < 0.3:
        return f"{rng.choice(_SUBJECTS)} was not {rng.choice(_NEGATIVE if positive else _POSITIVE)}"
    return f"{rng.choice(_SUBJECTS)} was {rng.choice(_POSITIVE if positive else _NEGATIVE)}"


def sentiment_csv(num_rows: int, rng: random.Random) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    for _ in range(num_rows):
        positive = rng.random() < 0.5
        text = _clause(rng, positive)
        if rng.random() < 0.35:  # a contrast: the first clause has the other polarity
            text = f"{_clause(rng, not positive)}, but {text}"
        writer.writerow([text[0].upper() + text[1:] + ".", "positive" if positive else "negative"])
    return buffer.getvalue()


def capital_rows(questions: tuple[str, ...], rng: random.Random) -> list[dict]:
    """Every (country, phrasing) once, as alpaca rows in a seeded order."""
    rows = [{"instruction": question.format(country=country), "input": "", "output": capital}
            for country, capital in CAPITALS for question in questions]
    rng.shuffle(rows)
    return rows


def file_contents(seed: int = 0) -> dict[str, str]:
    """Every file's text keyed by its path under the data folder; a pure function of ``seed``."""
    rows = dataset_rows(seed)
    capitals = sorted({r["output"] for r in rows["alpaca_train"] if task_of(r) == "capital"})
    rng = random.Random(seed)
    files = {}
    for split, (num_pairs, num_classified) in _SIZES.items():
        source = rows[f"alpaca_{split}"]
        pairs = preference_rows(source[:num_pairs], rng, capitals)
        files[f"preference/{split}.jsonl"] = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        prompts = [{"prompt": p["prompt"], "answer": p["chosen"]} for p in pairs]
        files[f"preference/prompts_{split}.jsonl"] = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)
        files[f"classification/{split}.csv"] = classification_csv(source[-num_classified:])
    sentiment = random.Random(seed + 1)
    for split, num_rows in _SENTIMENT_SIZES.items():
        files[f"sentiment/{split}.csv"] = sentiment_csv(num_rows, sentiment)
    capitals_rng = random.Random(seed + 2)
    for split, questions in _CAPITAL_QUESTIONS.items():
        questions_asked = capital_rows(questions, capitals_rng)
        files[f"capitals/{split}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in questions_asked)
        prompts = [{"prompt": ALPACA_PROMPT.format(instruction=r["instruction"]), "answer": r["output"]}
                   for r in questions_asked]
        files[f"capitals/prompts_{split}.jsonl"] = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)
    return files


def generate(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write the files under ``out_dir``; the bytes depend only on ``seed``."""
    written = []
    for name, text in file_contents(seed).items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tunefleet.launcher.data.tiny_data <data_dir>")
    for written in generate(Path(sys.argv[1])):
        print(written)
