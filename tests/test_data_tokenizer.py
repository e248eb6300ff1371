"""WordPiece loading: tokenizer.json vs vocab.txt, lower-casing, and vocabulary/model mismatch errors."""
from __future__ import annotations

import json
import shutil

import pytest

from common.errors import WorkbenchError
from data.squad import load_squad
from data.tokenizer import load_wordpiece
from tests.conftest import DEV, MINILM

TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "Cat", "play", "##ing",
          ",", "."]


def make_model(tmp_path, tokens=TOKENS, lower=None, name="model"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    if lower is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    return folder


def test_builds_bert_tokenizer_from_vocab(tmp_path):
    wp = load_wordpiece(make_model(tmp_path))
    assert (wp.vocab_size, wp.cls_id, wp.sep_id, wp.pad_id) == (len(TOKENS), 2, 3, 0)
    enc = wp.tokenizer.encode("The CAT, playing.", "on the mat")
    assert enc.tokens == ["[CLS]", "the", "cat", ",", "play", "##ing", ".", "[SEP]", "on", "the", "mat", "[SEP]"]
    assert enc.type_ids == [0] * 8 + [1] * 4
    assert enc.offsets[4:6] == [(9, 13), (13, 16)]
    assert wp.tokenizer.truncation is None and wp.tokenizer.padding is None


def test_do_lower_case_false_keeps_case(tmp_path):
    wp = load_wordpiece(make_model(tmp_path, lower=False))
    assert wp.tokenizer.encode("Cat cat CAT", add_special_tokens=False).tokens == ["Cat", "cat", "[UNK]"]
    assert wp.digest != load_wordpiece(make_model(tmp_path, lower=True, name="lower")).digest


def test_digest_follows_content_not_location(tmp_path):
    a, b = make_model(tmp_path, name="a"), make_model(tmp_path, name="b")
    assert load_wordpiece(a).digest == load_wordpiece(b).digest
    c = make_model(tmp_path, tokens=TOKENS + ["dog"], name="c")
    assert load_wordpiece(c).digest != load_wordpiece(a).digest


def test_prefers_tokenizer_json_and_drops_its_truncation(tmp_path):
    folder = make_model(tmp_path)
    tok = load_wordpiece(folder).tokenizer
    tok.enable_truncation(4)
    tok.enable_padding(length=16)
    json_only = tmp_path / "json_only"
    json_only.mkdir()
    tok.save(str(json_only / "tokenizer.json"))
    wp = load_wordpiece(json_only)
    assert wp.tokenizer.truncation is None and wp.tokenizer.padding is None
    assert wp.tokenizer.encode("the cat sat on the mat").ids == load_wordpiece(folder).tokenizer.encode(
        "the cat sat on the mat").ids
    assert wp.digest != load_wordpiece(folder).digest  # a different source file


def test_tokenizer_config_lowercase_overrides_tokenizer_json(tmp_path):
    folder = make_model(tmp_path)  # lower-casing tokenizer.json
    load_wordpiece(folder).tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert load_wordpiece(folder).tokenizer.encode("Cat", add_special_tokens=False).tokens == ["Cat"]


def test_no_tokenizer_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="no tokenizer.json or vocab.txt"):
        load_wordpiece(tmp_path / "empty")
    with pytest.raises(WorkbenchError, match="not found"):
        load_wordpiece(tmp_path / "absent")


def test_vocab_without_special_tokens(tmp_path):
    folder = make_model(tmp_path, tokens=[t for t in TOKENS if t != "[SEP]"])
    with pytest.raises(WorkbenchError, match=r"vocab.txt: vocabulary lacks \[SEP\]"):
        load_wordpiece(folder)


def test_vocab_larger_than_model(tmp_path):
    folder = make_model(tmp_path)
    with pytest.raises(WorkbenchError) as info:
        load_wordpiece(folder, vocab_size=len(TOKENS) - 1)
    assert str(info.value) == (f"vocab.txt has {len(TOKENS)} tokens but the model's config.json says vocab_size "
                               f"{len(TOKENS) - 1}: the vocabulary does not belong to this model")
    assert load_wordpiece(folder, vocab_size=len(TOKENS) + 5).vocab_size == len(TOKENS)  # padded embeddings are fine


def test_vocab_much_smaller_than_the_models_embedding_table_is_another_models(tmp_path):
    """Issue 23, item 4: a 1,000-line vocab.txt beside a 30,522-row model answered garbage."""
    from data.tokenizer import EMBEDDING_PADDING

    folder = make_model(tmp_path)
    rows = len(TOKENS) + EMBEDDING_PADDING
    with pytest.raises(WorkbenchError) as info:
        load_wordpiece(folder, vocab_size=rows)
    assert str(info.value) == (f"vocab.txt has {len(TOKENS)} tokens but the model's config.json says vocab_size "
                               f"{rows}: the vocabulary does not belong to this model")
    assert load_wordpiece(folder, vocab_size=rows - 1).vocab_size == len(TOKENS)


def test_tokenizer_json_and_vocab_txt_disagree(tmp_path):
    folder = make_model(tmp_path, tokens=TOKENS + ["dog"])
    load_wordpiece(folder).tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    with pytest.raises(WorkbenchError, match="not the same vocabulary"):
        load_wordpiece(folder)


def test_malformed_tokenizer_json(tmp_path):
    folder = make_model(tmp_path)
    (folder / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(WorkbenchError, match="tokenizer.json: cannot load tokenizer"):
        load_wordpiece(folder)
    (folder / "tokenizer.json").write_text("{")
    with pytest.raises(WorkbenchError, match="tokenizer.json: malformed"):
        load_wordpiece(folder)


@pytest.mark.shared
def test_minilm_tokenizer_json_matches_vocab_txt(tmp_path):
    slow = tmp_path / "vocab_only"
    slow.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(MINILM / name, slow / name)
    fast, built = load_wordpiece(MINILM, vocab_size=30522), load_wordpiece(slow, vocab_size=30522)
    assert (fast.vocab_size, fast.cls_id, fast.sep_id, fast.pad_id) == (30522, 101, 102, 0)
    assert (built.vocab_size, built.cls_id, built.sep_id, built.pad_id) == (30522, 101, 102, 0)
    examples = load_squad(DEV).examples[::500]
    pairs = [(e.question, e.context) for e in examples]
    pairs.append(("Café [MASK] naïve 中文?", "Ünïcödé — “quotes” \x00 x"))
    for a, b in zip(fast.tokenizer.encode_batch(pairs), built.tokenizer.encode_batch(pairs)):
        assert (a.ids, a.offsets, a.type_ids) == (b.ids, b.offsets, b.type_ids)
