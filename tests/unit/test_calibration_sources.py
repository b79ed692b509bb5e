"""Calibration sources: local .txt and .jsonl files (with an error naming the line for each
kind of bad input), and Hub datasets, which here (offline) fail with a clear message."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoTokenizer

from quantcore.data.datasets import calibration_samples, evaluation_tokens
from quantcore.data.files import read_documents
from quantcore.errors import BadRequestError

PROSE = [
    "The river rises in the hills north of the town and runs south through farmland.",
    "Its valley was settled early; mills stood on its banks for three hundred years.",
    "Today the water is clean again, and the old mill race is a walking path.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _txt(tmp_path, n: int = 20):
    path = tmp_path / "cal.txt"
    path.write_text("\n\n".join(f"{PROSE[i % 3]} ({i})" for i in range(n)) + "\n")
    return path


def _jsonl(tmp_path, lines: list[str]):
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_txt_documents_are_split_on_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nstill first\n\n  \n\nsecond doc\n\n\n")
    assert read_documents(str(path)) == ["first doc\nstill first", "second doc"]


def test_file_samples_are_seeded_and_come_from_the_file(tokenizer, tmp_path):
    path = str(_txt(tmp_path))
    a = calibration_samples(tokenizer, "file", 4, 16, seed=1, path=path)
    assert a.shape == (4, 16)
    assert torch.equal(a, calibration_samples(tokenizer, "file", 4, 16, seed=1, path=path))
    assert not torch.equal(a, calibration_samples(tokenizer, "file", 4, 16, seed=2, path=path))
    text = open(path).read()
    for row in a:
        assert tokenizer.decode(row[2:12]).strip() in text


def test_jsonl_reads_the_named_field(tokenizer, tmp_path):
    lines = [json.dumps({"body": p, "id": i}) for i, p in enumerate(PROSE * 4)]
    path = str(_jsonl(tmp_path, lines))
    assert read_documents(path, "body") == PROSE * 4
    s = calibration_samples(tokenizer, "file", 2, 16, seed=0, path=path, text_field="body")
    assert s.shape == (2, 16)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', '{"text": "ok"}', '{"text": oops}'], r"line 3: not valid JSON"),
        (['{"text": "ok"}', '["a list"]'], r"line 2: expected a JSON object, got list"),
        (['{"text": "ok"}', '{"body": "x"}'], r"line 2: no field 'text' \(its fields: body\)"),
        (['{"text": 5}'], r"line 1: field 'text' is int, not a string"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    with pytest.raises(BadRequestError, match=message):
        read_documents(str(_jsonl(tmp_path, lines)))


def test_empty_and_unsupported_files(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(BadRequestError, match="empty.txt is empty"):
        calibration_samples(tokenizer, "file", 2, 16, seed=0, path=str(empty))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(BadRequestError, match=r"unsupported type \.csv; use \.txt"):
        calibration_samples(tokenizer, "file", 2, 16, seed=0, path=str(csv))
    with pytest.raises(BadRequestError, match="needs `path`"):
        calibration_samples(tokenizer, "file", 2, 16, seed=0)
    with pytest.raises(BadRequestError, match="does not exist"):
        calibration_samples(tokenizer, "file", 2, 16, seed=0, path=str(tmp_path / "no.txt"))


def test_too_few_tokens_says_how_many(tokenizer, tmp_path):
    path = _txt(tmp_path, n=1)
    with pytest.raises(BadRequestError, match=r"has \d+ tokens; seq_len=512 needs more than 512"):
        calibration_samples(tokenizer, "file", 2, 512, seed=0, path=str(path))


def test_unknown_dataset_lists_the_choices(tokenizer):
    with pytest.raises(BadRequestError, match="unknown calibration dataset 'wiki'.*wikitext2"):
        calibration_samples(tokenizer, "wiki", 2, 16, seed=0)


@pytest.mark.parametrize("name", ["wikitext2", "c4", "pileval"])
def test_hub_datasets_offline_say_they_need_the_network(tokenizer, name):
    with pytest.raises(BadRequestError, match=rf"dataset '{name}' .* needs network access"):
        calibration_samples(tokenizer, name, 2, 16, seed=0)


def test_hub_datasets_without_the_package_say_how_to_install_it(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what an absent package looks like
    with pytest.raises(BadRequestError, match=r"`datasets` package, which is not installed"):
        calibration_samples(tokenizer, "c4", 2, 16, seed=0)
    with pytest.raises(BadRequestError, match="not installed"):
        evaluation_tokens(tokenizer, "wikitext2")
