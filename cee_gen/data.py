"""Datasets for training and benchmarks: Alpaca, Dolly and CNN/DM, split, templated, length-limited.

Sources, in order: `data_dir` (argument), `$CEE_GEN_DATA` (a folder of gzip JSON Lines, laid out as
docs/benchmarks.md, "Data", describes), else the same sets by name from the hub through HF `datasets`
(`pip install -e '.[data]'`). Each row becomes an `Example` with a stable string id.

Splits (fixed, documented, the same everywhere): a row's split is decided by sha256("<set>:<id>")
mod 100: 0-79 train, 80-89 dev, 90-99 test. Training reads only train, tuning only dev, and reported
results only test. The split depends on the id alone, so it does not change with file order, with a
partial file, or between a local copy and the hub (the ids are the hub's).

Templates (ConsistentEE's evaluation): `alpaca` (with and without input, as Stanford Alpaca),
`cnndm` ("Please generate highlights for the articles.\\n\\n{article}\\n\\n### highlights:\\n"), or
`chat` (the tokenizer's chat template around the instruction and input). Length limits cut the
*source text* (the input or the article), never the template, so a long article still ends in
"### highlights:". Default prompt limit 1,024 tokens, not the authors' 256, which keeps only the
first ~150 words of a CNN/DM article (median ~650 words here).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cee_gen.errors import CeeGenError

SPLITS = ("train", "dev", "test")
TEMPLATES = ("alpaca", "cnndm", "chat")

ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
CNNDM = "Please generate highlights for the articles.\n\n{article}\n\n### highlights:\n"


@dataclass(frozen=True)
class DatasetSpec:
    file: str  # in the data folder
    hub: tuple  # load_dataset(*hub)
    hub_split: str
    template: str  # the default template


DATASETS = {
    "alpaca": DatasetSpec("alpaca.jsonl.gz", ("tatsu-lab/alpaca",), "train", "alpaca"),
    "dolly": DatasetSpec("dolly.jsonl.gz", ("databricks/databricks-dolly-15k",), "train", "alpaca"),
    "cnndm": DatasetSpec("cnndm_test.jsonl.gz", ("cnn_dailymail", "3.0.0"), "test", "cnndm"),
}


@dataclass(frozen=True)
class Example:
    dataset: str
    id: str
    instruction: str  # for cnndm: the article
    input: str
    reference: str  # the gold output / highlights

    @property
    def split(self) -> str:
        return split_of(self.dataset, self.id)


def split_of(dataset: str, row_id: str) -> str:
    """The fixed split of a row: sha256("<set>:<id>") mod 100 -> train (<80), dev (<90), test."""
    b = int(hashlib.sha256(f"{dataset}:{row_id}".encode()).hexdigest(), 16) % 100
    return "train" if b < 80 else "dev" if b < 90 else "test"


def default_data_dir() -> Path | None:
    env = os.environ.get("CEE_GEN_DATA")
    return Path(env).expanduser() if env else None


def _from_row(name: str, row: dict) -> Example:
    if name == "cnndm":
        return Example(name, str(row["id"]), row["article"], "", row["highlights"])
    if name == "dolly" and "context" in row:  # hub field names
        return Example(name, str(row["id"]), row["instruction"], row["context"], row["response"])
    return Example(name, str(row["id"]), row["instruction"], row.get("input", ""), row["output"])


def load_examples(name: str, data_dir: str | Path | None = None) -> list[Example]:
    """Every row of a dataset, from the data folder, else from the hub."""
    if name not in DATASETS:
        raise CeeGenError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if folder is not None:
        path = folder / spec.file
        if not path.is_file():
            raise CeeGenError(f"no {spec.file} in data folder {folder}: pass the folder that holds it "
                              "(--data-dir / CEE_GEN_DATA)")
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return [_from_row(name, json.loads(line)) for line in f if line.strip()]
        except (OSError, EOFError, json.JSONDecodeError, KeyError) as e:
            raise CeeGenError(f"cannot read {path} ({type(e).__name__}: {e}): it is damaged or not in the "
                              "documented schema") from None
    return _from_hub(name, spec)


def _from_hub(name: str, spec: DatasetSpec) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise CeeGenError(f"dataset {name!r}: no local data folder and HF `datasets` is not installed: "
                          "pip install -e '.[data]' to read it from the hub, or pass --data-dir DIR (or set "
                          f"CEE_GEN_DATA) holding {spec.file} (layout: docs/benchmarks.md, Data)") from None
    try:
        ds = datasets.load_dataset(*spec.hub, split=spec.hub_split)
    except Exception as e:
        raise CeeGenError(f"could not load {spec.hub[0]!r} from the hub ({type(e).__name__}): pass a local "
                          "data folder with --data-dir / CEE_GEN_DATA") from None
    rows = []
    for i, row in enumerate(ds):
        row = dict(row)
        row.setdefault("id", i)  # Alpaca and Dolly on the hub have no id: their row number
        rows.append(_from_row(name, row))
    return rows


def load_split(name: str, split: str, data_dir: str | Path | None = None,
               limit: int | None = None) -> list[Example]:
    """The rows of one split, in file order; `limit` keeps the first n of them."""
    if split not in SPLITS:
        raise CeeGenError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    rows = [e for e in load_examples(name, data_dir) if e.split == split]
    if not rows:
        raise CeeGenError(f"dataset {name!r} has no {split} rows here")
    return rows[:limit] if limit is not None else rows


def _cut(tok, text: str, max_tokens: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tok.decode(ids[:max_tokens])


def render(ex: Example, template: str | None = None, tokenizer=None,
           max_prompt_tokens: int | None = 1024) -> str:
    """The prompt text for an example. With a tokenizer and a limit, the source text (input or
    article) is cut so the whole prompt fits in `max_prompt_tokens` tokens."""
    template = template or DATASETS[ex.dataset].template
    if template not in TEMPLATES:
        raise CeeGenError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")

    def fill(instruction: str, inp: str) -> str:
        if template == "cnndm":
            return CNNDM.format(article=instruction)
        if template == "alpaca":
            return ALPACA_INPUT.format(instruction=instruction, input=inp) if inp else \
                ALPACA_NO_INPUT.format(instruction=instruction)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise CeeGenError("template chat needs a tokenizer with a chat template")
        if ex.dataset == "cnndm":  # the article alone is no instruction: keep the task's sentence
            content = CNNDM.split("\n\n{article}")[0] + "\n\n" + instruction
        else:
            content = f"{instruction}\n\n{inp}" if inp else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)

    text = fill(ex.instruction, ex.input)
    if tokenizer is None or max_prompt_tokens is None:
        return text
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n <= max_prompt_tokens:
        return text
    src_is_instruction = template == "cnndm" or not ex.input
    src = ex.instruction if src_is_instruction else ex.input
    room = len(tokenizer(src, add_special_tokens=False)["input_ids"])
    while n > max_prompt_tokens:  # token boundaries can shift when the text is cut: re-measure
        room -= n - max_prompt_tokens
        if room < 1:
            raise CeeGenError(f"max_prompt_tokens {max_prompt_tokens} leaves no room for the text of "
                              f"{ex.dataset} row {ex.id}: raise it")
        src = _cut(tokenizer, src, room)
        text = fill(src, ex.input) if src_is_instruction else fill(ex.instruction, src)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text
