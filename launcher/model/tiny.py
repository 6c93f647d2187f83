"""The project's offline tiny models, their tokenizer and the shipped task data.

Everything here is built from code, never downloaded: synthetic instruction
tasks with deterministic answers (small enough that a ~1M-parameter model shows
learning within a few hundred CPU steps), a byte-level BPE tokenizer trained on
that data, and random-init Llama / Qwen2 / Mistral models for ``tiny:<spec>``
recipes. Every output is a pure function of its inputs, so two nodes building
the same spec get byte-identical tokenizers and weights.

Regenerate the committed data with
``python -m tunefleet.launcher.model.tiny recipes/tiny/data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tunefleet.launcher.errors import UserError

# --------------------------------------------------------------------------- synthetic tasks
Example = tuple[str, str, str]  # (instruction, input, output)

_WORDS = [
    "river", "garden", "window", "lantern", "teacher", "market", "bridge", "forest", "letter", "kettle",
    "harbor", "candle", "mountain", "village", "engine", "pocket", "meadow", "violin", "basket", "tower",
    "table", "mirror", "pencil", "ladder", "blanket", "island", "rocket", "summer", "winter", "orange",
    "silver", "yellow", "quiet", "bright", "gentle", "narrow", "golden", "purple", "simple", "clever",
    "hollow", "distant",
]
_NOUNS, _ADJECTIVES = _WORDS[:30], _WORDS[30:]
_VERBS = ["rested", "waited", "glowed", "leaned", "drifted", "stood", "slept", "turned", "moved", "shone"]
_PREPOSITIONS = ["near", "under", "beside", "behind", "above", "across"]
_TIMES = ["morning", "evening", "night", "spring", "autumn"]

# Made-up countries, so every answer must be learned from the data.
CAPITALS = (
    ("Veloria", "Marenth"), ("Quasmir", "Dolvik"), ("Tarnevia", "Osselin"),
    ("Brundal", "Kepport"), ("Islavia", "Norrow"), ("Meridane", "Calsby"),
    ("Zoltrane", "Fenmark"), ("Orvania", "Lustrel"), ("Pellmark", "Thistow"),
    ("Corvash", "Elderwick"), ("Jandoria", "Rimhold"), ("Sembria", "Gallowen"),
    ("Ustrava", "Pindle"), ("Kalmora", "Brisket"), ("Nerovia", "Halden"),
    ("Thessaly Nova", "Ormond"), ("Drevania", "Salkirk"), ("Wynlar", "Castemoor"),
    ("Fallorn", "Vittles"), ("Esmerine", "Grollin"), ("Rostavia", "Mellow Bay"),
    ("Gildreth", "Ashcombe"), ("Lunavar", "Peverel"), ("Hollin", "Dunmere"),
)
_CAPITAL_QUESTIONS = (
    "What is the capital of {country}?",
    "Name the capital city of {country}.",
    "Which city is the capital of {country}?",
    "Tell me the capital of {country}.",
    "{country} has which capital?",
)
_SYSTEM_PROMPTS = (
    "You are a concise assistant.",
    "You are a helpful assistant. Answer with the result only.",
    "Reply briefly and exactly.",
)


def _reverse(rng: random.Random) -> Example:
    word = rng.choice(_WORDS)
    return "Reverse the word.", word, word[::-1]


def _uppercase(rng: random.Random) -> Example:
    text = " ".join(rng.sample(_WORDS, rng.randint(2, 3)))
    return "Uppercase the text.", text, text.upper()


def _sort_letters(rng: random.Random) -> Example:
    letters = "".join(rng.sample(string.ascii_lowercase, rng.randint(4, 6)))
    return "Sort the letters.", letters, "".join(sorted(letters))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"Add {a} and {b}.", "", str(a + b)


def _capital(rng: random.Random) -> Example:
    country, capital = rng.choice(CAPITALS)
    return rng.choice(_CAPITAL_QUESTIONS).format(country=country), "", capital


_TASKS: tuple[Callable[[random.Random], Example], ...] = (_reverse, _uppercase, _sort_letters, _add, _capital)


def _is_eval(example: Example) -> bool:
    """About 10% of all prompts are eval-only, fixed by a stable hash of the prompt."""
    instruction, input_text, _ = example
    return zlib.crc32(f"{instruction}\x1f{input_text}".encode()) % 10 == 0


def _examples(rng: random.Random, num: int, eval_split: bool) -> list[Example]:
    """`num` examples from one split; eval examples are unique, train ones may repeat."""
    examples: list[Example] = []
    seen: set[Example] = set()
    while len(examples) < num:
        example = rng.choice(_TASKS)(rng)
        if _is_eval(example) != eval_split or (eval_split and example in seen):
            continue
        seen.add(example)
        examples.append(example)
    return examples


def _alpaca_rows(rng: random.Random, num: int, eval_split: bool) -> list[dict]:
    return [
        {"instruction": instruction, "input": input_text, "output": output}
        for instruction, input_text, output in _examples(rng, num, eval_split)
    ]


def _chat_rows(rng: random.Random, num: int, eval_split: bool) -> list[dict]:
    """One or two user/assistant exchanges per row; a third of the rows start with a system message."""
    num_exchanges = [rng.choice((1, 1, 2)) for _ in range(num)]
    examples = iter(_examples(rng, sum(num_exchanges), eval_split))
    rows = []
    for count in num_exchanges:
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
        for instruction, input_text, output in (next(examples) for _ in range(count)):
            prompt = f"{instruction}\n{input_text}" if input_text else instruction
            messages.append({"role": "user", "content": prompt})
            messages.append({"role": "assistant", "content": output})
        rows.append({"messages": messages})
    return rows


def _sentence(rng: random.Random) -> str:
    adjective, noun, other = rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_NOUNS)
    country, capital = rng.choice(CAPITALS)
    templates = (
        f"The {adjective} {noun} {rng.choice(_VERBS)} {rng.choice(_PREPOSITIONS)} the {other}.",
        f"In {country}, people travel to {capital} to see the {adjective} {noun}.",
        f"Every {rng.choice(_TIMES)}, a {noun} {rng.choice(_VERBS)} {rng.choice(_PREPOSITIONS)} the {other}.",
        f"Nobody in {capital} had seen a {noun} so {adjective}.",
    )
    return rng.choice(templates)


def _text_rows(rng: random.Random, num: int) -> list[dict]:
    return [{"text": " ".join(_sentence(rng) for _ in range(rng.randint(2, 3)))} for _ in range(num)]


def dataset_rows(seed: int = 0) -> dict[str, list[dict]]:
    """Every shipped file's rows, keyed by file stem, built in memory."""
    rng = random.Random(seed)
    return {
        "alpaca_train": _alpaca_rows(rng, 3000, eval_split=False),
        "alpaca_eval": _alpaca_rows(rng, 200, eval_split=True),
        "chat_train": _chat_rows(rng, 2000, eval_split=False),
        "chat_eval": _chat_rows(rng, 200, eval_split=True),
        "text_reference": _text_rows(rng, 200),
    }


def generate_datasets(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the JSONL files into `out_dir`; the bytes depend only on `seed`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stem, rows in dataset_rows(seed).items():
        path = out_dir / f"{stem}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        paths[stem] = path
    return paths


def tokenizer_corpus() -> list[str]:
    """The text the tiny tokenizer is trained on: every training file plus the prose file."""
    rows = dataset_rows(seed=0)
    texts = [t for row in rows["alpaca_train"] for t in row.values() if t]
    texts += [m["content"] for row in rows["chat_train"] for m in row["messages"]]
    texts += [row["text"] for row in rows["text_reference"]]
    return texts


# --------------------------------------------------------------------------- tokenizer
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
IM_START_TOKEN, IM_END_TOKEN = "<|im_start|>", "<|im_end|>"
# Trained first, so their ids are 0..5 in this order. Byte-level BPE never emits
# unk, but naming one stops loaders (e.g. Qwen2Tokenizer) from adding their own.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
TOKENIZER_VOCAB_SIZE = 1024
# Qwen2's pipeline (digits split one by one): AutoTokenizer rebuilds this very
# pipeline for `qwen2` folders, so every arch must use it to encode the same.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (one regex)
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _untrained_tokenizer() -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = TOKENIZER_VOCAB_SIZE
) -> transformers.PreTrainedTokenizerFast:
    """A deterministic byte-level BPE with ChatML special tokens; encoding adds no special tokens."""
    backend = _untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------- models
_ARCHS = {
    "llama": (transformers.LlamaConfig, {"tie_word_embeddings": False}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),  # tied, like Qwen2.5-0.5B
    "mistral": (transformers.MistralConfig, {"tie_word_embeddings": False, "sliding_window": None}),
}
_SIZES = {
    "": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=12,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048),
    "50m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
    # The GPU benchmark's 1.1B Llama (TinyLlama's shape): a 32000-row vocabulary, as real models have, of
    # which the tokenizer uses the first TOKENIZER_VOCAB_SIZE; too big for CPU tests.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000),
}
TINY_SPECS = tuple(f"{arch}-{size}" if size else arch for arch in _ARCHS for size in _SIZES)
_INIT_SEED = 0


def tiny_config(spec: str) -> transformers.PretrainedConfig:
    """The model config of `tiny:<spec>`, without building weights or the tokenizer."""
    if spec not in TINY_SPECS:
        raise UserError(f"unknown tiny model 'tiny:{spec}'; valid: {', '.join('tiny:' + s for s in TINY_SPECS)}")
    arch, _, size = spec.partition("-")
    config_class, arch_kwargs = _ARCHS[arch]
    return config_class(
        **{"vocab_size": TOKENIZER_VOCAB_SIZE, **_SIZES[size]},
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        **arch_kwargs,
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUNEFLEET_CACHE") or Path.home() / ".cache" / "tunefleet")


def ensure_tiny_model(spec: str, cache_dir: Path | None = None) -> Path:
    """The folder of `tiny:<spec>` (weights, config, tokenizer), built once per cache."""
    config = tiny_config(spec)
    tokenizer = build_tokenizer(tokenizer_corpus())
    assert len(tokenizer) <= config.vocab_size, (len(tokenizer), config.vocab_size)
    digest = hashlib.sha256((config.to_json_string() + tokenizer.backend_tokenizer.to_str()).encode())
    target = (cache_dir or default_cache_dir()) / "tiny-models" / f"{spec}-{digest.hexdigest()[:12]}"
    if not target.exists():
        _build_atomically(config, tokenizer, target)
    return target


def _build_atomically(
    config: transformers.PretrainedConfig, tokenizer: transformers.PreTrainedTokenizerFast, target: Path
) -> None:
    """Save into a temp sibling, then rename; if another process won the race, keep theirs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_INIT_SEED)
            model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp)
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tunefleet.launcher.model.tiny <out_dir>")
    for written in generate_datasets(Path(sys.argv[1])).values():
        print(written)
