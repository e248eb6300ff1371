"""SQuAD reading: fields, v2 detection, limits, and one-line errors that name the file and JSON location."""
from __future__ import annotations

import json

import pytest

from common.errors import WorkbenchError
from common.files import sha256_file
from data.squad import Answer, examples_from_pairs, load_squad
from tests.conftest import DEV

CONTEXT = "The cat sat on the mat. It was warm."


def squad(qas_per_para=((("q1", "Where did the cat sit?", [{"text": "the mat", "answer_start": 15}]),),),
          version="1.1", title="Cats"):
    paragraphs = [{"context": CONTEXT, "qas": [{"id": i, "question": q, "answers": a} for i, q, a in qas]}
                  for qas in qas_per_para]
    return {"version": version, "data": [{"title": title, "paragraphs": paragraphs}]}


def write(tmp_path, doc, name="dev.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


def error_of(path, **kw) -> str:
    with pytest.raises(WorkbenchError) as info:
        load_squad(path, **kw)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_loads_v1_fields(tmp_path):
    path = write(tmp_path, squad())
    sq = load_squad(path)
    assert sq.version == "1.1" and sq.path == path and sq.digest == sha256_file(path)
    (ex,) = sq.examples
    assert (ex.qid, ex.question, ex.context, ex.title, ex.is_impossible) == \
        ("q1", "Where did the cat sit?", CONTEXT, "Cats", False)
    assert ex.answers == (Answer("the mat", 15),)
    assert CONTEXT[15:22] == "the mat"


def test_question_leading_whitespace_is_stripped(tmp_path):
    sq = load_squad(write(tmp_path, squad(((("q1", "      Who sat? ", []),),))))
    assert sq.examples[0].question == "Who sat? "


def test_limit_keeps_first_questions_in_file_order(tmp_path):
    paras = (tuple((f"a{i}", f"question {i}?", []) for i in range(3)),
             tuple((f"b{i}", f"question {i}?", []) for i in range(2)))
    path = write(tmp_path, squad(paras))
    assert [e.qid for e in load_squad(path).examples] == ["a0", "a1", "a2", "b0", "b1"]
    assert [e.qid for e in load_squad(path, limit=4).examples] == ["a0", "a1", "a2", "b0"]
    assert len(load_squad(path, limit=1000).examples) == 5
    assert "limit" in error_of(path, limit=0)


def test_v2_detected_from_version_field(tmp_path):
    assert load_squad(write(tmp_path, squad(version="v2.0"))).version == "2.0"


def test_v2_detected_from_is_impossible(tmp_path):
    doc = squad()
    doc["data"][0]["paragraphs"][0]["qas"].append(
        {"id": "q2", "question": "Who flew?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "cat", "answer_start": 4}]})
    sq = load_squad(write(tmp_path, doc))
    assert sq.version == "2.0"
    assert sq.examples[1].is_impossible and sq.examples[1].answers == ()
    assert not sq.examples[0].is_impossible


def test_missing_file(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.json")


def test_malformed_json_reports_line_and_column(tmp_path):
    assert "line 2 column" in error_of(write(tmp_path, '{"data": [\n  oops]}'))


@pytest.mark.parametrize("doc", [[1, 2], {"version": "1.1"}, {"data": {"a": 1}}])
def test_top_level_must_have_a_data_list(tmp_path, doc):
    assert '"data" list' in error_of(write(tmp_path, doc))


def test_empty_data_set(tmp_path):
    assert "no questions" in error_of(write(tmp_path, {"data": []}))
    assert "no questions" in error_of(write(tmp_path, squad(((),))))


def test_missing_question_names_json_location(tmp_path):
    doc = squad()
    del doc["data"][0]["paragraphs"][0]["qas"][0]["question"]
    path = write(tmp_path, doc)
    assert error_of(path) == f'{path}: data[0].paragraphs[0].qas[0]: missing "question"'


def test_duplicate_question_id(tmp_path):
    message = error_of(write(tmp_path, squad(((("q1", "a?", []),), (("q1", "b?", []),)))))
    assert 'duplicate question id "q1"' in message and "data[0].paragraphs[1].qas[0]" in message


def test_empty_question(tmp_path):
    assert "empty question" in error_of(write(tmp_path, squad(((("q1", "   ", []),),))))


def test_context_must_be_a_string(tmp_path):
    doc = squad()
    doc["data"][0]["paragraphs"][0]["context"] = ["not", "text"]
    assert "data[0].paragraphs[0].context: expected a string" in error_of(write(tmp_path, doc))


def test_answers_must_be_a_list(tmp_path):
    doc = squad()
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"] = {"text": "x"}
    assert "qas[0].answers: expected a list" in error_of(write(tmp_path, doc))


@pytest.mark.parametrize("start", ["15", 1.5, True, None])
def test_answer_start_must_be_an_int(tmp_path, start):
    path = write(tmp_path, squad(((("q1", "Where?", [{"text": "the mat", "answer_start": start}]),),)))
    assert "answers[0].answer_start: expected an integer" in error_of(path)


def test_answer_outside_context(tmp_path):
    path = write(tmp_path, squad(((("q1", "Where?", [{"text": "the mat", "answer_start": 500}]),),)))
    assert "outside the context" in error_of(path)


def test_impossible_question_with_answers(tmp_path):
    doc = squad()
    doc["data"][0]["paragraphs"][0]["qas"][0]["is_impossible"] = True
    assert "is_impossible" in error_of(write(tmp_path, doc))


def test_examples_from_pairs():
    examples = examples_from_pairs("Some context.", ["  What?", "Why?"])
    assert [(e.qid, e.question, e.context, e.answers) for e in examples] == \
        [("q1", "What?", "Some context.", ()), ("q2", "Why?", "Some context.", ())]


def test_examples_from_pairs_rejects_empty_text():
    with pytest.raises(WorkbenchError, match="context is empty"):
        examples_from_pairs("  \n", ["What?"])
    with pytest.raises(WorkbenchError, match="question 2 is empty"):
        examples_from_pairs("Context.", ["What?", "\t "])


@pytest.mark.shared
def test_real_dev_set():
    sq = load_squad(DEV)
    assert sq.version == "1.1" and len(sq.examples) == 10570
    assert len({e.qid for e in sq.examples}) == 10570
    assert all(e.context[a.start:a.start + len(a.text)] == a.text for e in sq.examples for a in e.answers)
    assert all(e.question == e.question.lstrip() for e in sq.examples)
