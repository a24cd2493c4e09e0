"""Datasets: the fixed split, the templates, length limits and clear errors (own small fixtures)."""

import gzip
import json
from collections import Counter

import pytest
from conftest import make_tokenizer

from cee_gen import data
from cee_gen.errors import CeeGenError


def _write(folder, name, rows):
    with gzip.open(folder / data.DATASETS[name].file, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture()
def data_dir(tmp_path):
    _write(tmp_path, "alpaca", [{"id": i, "instruction": f"do {i}", "input": "x" if i % 2 else "",
                                 "output": f"done {i}"} for i in range(300)])
    _write(tmp_path, "dolly", [{"id": i, "instruction": f"q {i}", "input": "", "output": "a",
                                "category": "open_qa"} for i in range(50)])
    _write(tmp_path, "cnndm", [{"id": f"{i:040x}", "test_index": i, "article": "word " * 400,
                                "highlights": "one\ntwo"} for i in range(40)])
    return tmp_path


def test_split_is_deterministic_disjoint_and_about_80_10_10():
    ids = [str(i) for i in range(5000)]
    a = [data.split_of("alpaca", i) for i in ids]
    assert a == [data.split_of("alpaca", i) for i in ids]  # the same every time
    c = Counter(a)
    assert set(c) == set(data.SPLITS) and sum(c.values()) == 5000  # each row in exactly one split
    assert abs(c["train"] / 5000 - 0.8) < 0.03 and abs(c["test"] / 5000 - 0.1) < 0.02
    # pinned: a change to the split function would silently move rows between train and test
    assert [data.split_of("alpaca", i) for i in ("0", "2", "13")] == ["test", "train", "dev"]


def test_split_depends_on_the_id_not_on_file_order(data_dir):
    rows = data.load_examples("alpaca", data_dir)
    by_id = {e.id: e.split for e in rows}
    _write(data_dir, "alpaca", [{"id": int(e.id), "instruction": e.instruction, "input": e.input,
                                 "output": e.reference} for e in reversed(rows)])
    assert {e.id: e.split for e in data.load_examples("alpaca", data_dir)} == by_id


def test_load_split_reads_only_that_split(data_dir):
    train = data.load_split("alpaca", "train", data_dir)
    test = data.load_split("alpaca", "test", data_dir)
    assert train and test and not {e.id for e in train} & {e.id for e in test}
    assert all(e.split == "test" for e in test)
    assert len(data.load_split("alpaca", "train", data_dir, limit=5)) == 5


def test_templates_render_as_documented():
    with_input = data.Example("alpaca", "1", "Add the numbers.", "2 and 3", "5")
    no_input = data.Example("alpaca", "2", "Name a colour.", "", "red")
    art = data.Example("cnndm", "a", "the article text .", "", "hi")
    assert data.render(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert data.render(no_input) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert data.render(art) == ("Please generate highlights for the articles.\n\nthe article text .\n\n"
                                "### highlights:\n")
    chat = data.render(with_input, "chat", make_tokenizer(), None)
    assert chat.startswith("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>")
    assert chat.endswith("<|im_start|>assistant\n")
    chat_art = data.render(art, "chat", make_tokenizer(), None)  # the task sentence stays with the article
    assert chat_art.startswith("<|im_start|>user\nPlease generate highlights for the articles.\n\n"
                               "the article text .<|im_end|>")


def test_long_articles_are_cut_in_the_text_and_keep_the_template(data_dir):
    tok = make_tokenizer()
    [ex] = data.load_examples("cnndm", data_dir)[:1]
    text = data.render(ex, tokenizer=tok, max_prompt_tokens=60)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 60
    assert text.startswith("Please generate highlights") and text.endswith("### highlights:\n")
    assert data.render(ex, tokenizer=tok, max_prompt_tokens=None) == data.render(ex)


def test_dolly_and_cnndm_map_their_fields(data_dir):
    d = data.load_examples("dolly", data_dir)[0]
    c = data.load_examples("cnndm", data_dir)[0]
    assert (d.instruction, d.reference) == ("q 0", "a")
    assert c.reference == "one\ntwo" and c.id == f"{0:040x}"


@pytest.mark.parametrize("call, words", [
    (lambda d: data.load_examples("squad", d), "unknown dataset"),
    (lambda d: data.load_split("alpaca", "val", d), "unknown split"),
    (lambda d: data.load_examples("alpaca", d / "nowhere"), "no alpaca.jsonl.gz in data folder"),
    (lambda d: data.render(data.Example("alpaca", "1", "x", "", ""), "poem"), "unknown template"),
])
def test_bad_data_requests_are_clear_errors(data_dir, call, words):
    with pytest.raises(CeeGenError, match=words):
        call(data_dir)


def test_damaged_data_file_is_a_clear_error(data_dir):
    (data_dir / "dolly.jsonl.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CeeGenError, match="damaged"):
        data.load_examples("dolly", data_dir)
