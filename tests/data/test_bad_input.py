"""Malformed records give one line naming file:line (the product fixes of the fault campaign)."""

from __future__ import annotations

import json

import pytest

from megatron_fusion.data.jsonl import JSONLError, read_jsonl
from megatron_fusion.data.preference import PreferenceDataset
from megatron_fusion.data.sft import SFTDataset
from megatron_fusion.tokenizers import load_tokenizer

GOOD = json.dumps({"prompt": "1+1=", "response": "2"}).encode()
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def tok(demo_data):
    t = load_tokenizer(demo_data["pivot_tokenizer"])
    t.chat_template = TEMPLATE
    return t


def _file(tmp_path, *lines: bytes):
    p = tmp_path / "data.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def _one_line(e: pytest.ExceptionInfo, path, line_no: int) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:{line_no}: "), msg
    return msg


@pytest.mark.parametrize("bad", [b'{"prompt": "\xff", "response": "b"}', b'{"prompt": "a\x80"}',
                                 b'{"prompt": "\xc3\x28", "response": "b"}'])
def test_invalid_utf8_names_the_line(tmp_path, bad):
    p = _file(tmp_path, GOOD, b"", bad, GOOD)
    with pytest.raises(JSONLError) as e:
        list(read_jsonl(p))
    assert "not valid UTF-8" in _one_line(e, p, 3)


def test_invalid_utf8_in_datasets(tmp_path, tok):
    pair = json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}).encode()
    p = _file(tmp_path, pair, b'{"prompt": "a", "chosen": "\xe2\x82", "rejected": "c"}')
    with pytest.raises(JSONLError) as e:
        PreferenceDataset(p, tok, 32)
    _one_line(e, p, 2)
    p = _file(tmp_path, GOOD, b'{"prompt": "\xe2\x82", "response": "c"}')
    with pytest.raises(JSONLError) as e:
        SFTDataset(p, tok, 32)
    _one_line(e, p, 2)


def test_valid_utf8_multibyte_still_reads(tmp_path, tok):
    p = _file(tmp_path, GOOD, json.dumps({"prompt": "é → 中", "response": "✓"}, ensure_ascii=False).encode())
    assert SFTDataset(p, tok, 32).stats.kept == 2


@pytest.mark.parametrize("role", ["wizard", "User", "human", "gpt"])
def test_unknown_role_names_the_line(tmp_path, tok, role):
    rec = {"messages": [{"role": role, "content": "a"}, {"role": "assistant", "content": "b"}]}
    p = _file(tmp_path, GOOD, json.dumps(rec).encode())
    with pytest.raises(JSONLError) as e:
        SFTDataset(p, tok, 32)
    assert repr(role) in _one_line(e, p, 2)


def test_known_roles_still_train(tmp_path, tok):
    rec = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"}, {"role": "tool", "content": "t"},
                        {"role": "assistant", "content": "c"}]}
    ds = SFTDataset(_file(tmp_path, json.dumps(rec).encode()), tok, 64)
    assert ds.stats.kept == 1 and ds.sample(0).response_spans and len(ds.sample(0).response_spans) == 2


def test_no_chat_template_names_the_line(tmp_path, demo_data):
    plain = load_tokenizer(demo_data["pivot_tokenizer"])
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    p = _file(tmp_path, GOOD, GOOD, json.dumps(rec).encode())
    with pytest.raises(JSONLError) as e:
        SFTDataset(p, plain, 32)
    assert "no chat template" in _one_line(e, p, 3)


def test_failing_chat_template_names_the_line(tmp_path, tok):
    tok.chat_template = "{{ raise_exception('only user/assistant alternation') }}"
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    p = _file(tmp_path, json.dumps(rec).encode())
    with pytest.raises(JSONLError) as e:
        SFTDataset(p, tok, 32)
    assert "only user/assistant alternation" in _one_line(e, p, 1)
