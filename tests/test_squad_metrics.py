"""Official SQuAD scoring rules on hand-made cases, plus an end-to-end check on the real dev set."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from common.errors import WorkbenchError
from eval.squad_metrics import SquadScore, exact_match, f1, normalize_answer, score_squad
from tests.conftest import DEV


@dataclass(frozen=True)
class Answer:
    text: str


@dataclass(frozen=True)
class Ex:
    qid: str
    answers: tuple
    is_impossible: bool = False


def ex(qid: str, *texts: str, impossible: bool = False) -> Ex:
    return Ex(qid, tuple(Answer(t) for t in texts), impossible)


# --- normalization -------------------------------------------------------------------------------------------

def test_punctuation_is_stripped_and_case_lowered():
    assert normalize_answer("Denver Broncos!") == "denver broncos"
    assert exact_match("Denver Broncos!", "denver broncos") == 1.0
    assert normalize_answer("Levi's Stadium, (Santa Clara).") == "levis stadium santa clara"
    assert normalize_answer("24-10") == "2410"  # ASCII hyphen is punctuation, removed without a space


def test_articles_removed_as_whole_words_only():
    assert normalize_answer("the Eiffel Tower") == "eiffel tower"
    assert exact_match("the Eiffel Tower", "Eiffel Tower") == 1.0
    assert normalize_answer("theatre") == "theatre"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Anthem of THE people") == "anthem of people"
    # punctuation goes first, so "A-Team" becomes the single word "ateam"
    assert normalize_answer("The A-Team") == "ateam"


def test_whitespace_collapsed():
    assert normalize_answer("  Super \t Bowl\n50  ") == "super bowl 50"
    assert normalize_answer("Super\u00a0Bowl") == "super bowl"  # str.split() treats NBSP as whitespace


def test_unicode_letters_kept_and_unicode_punctuation_not_stripped():
    assert normalize_answer("Café") == "café"
    assert exact_match("Café", "café") == 1.0
    assert exact_match("Café", "Cafe") == 0.0
    # en dash / em dash / curly quotes are not in string.punctuation: the official rule keeps them
    assert normalize_answer("24\u201310") == "24\u201310"
    assert exact_match("24\u201310", "24-10") == 0.0
    assert f1("24\u201310", "24-10") == 0.0
    assert normalize_answer("\u201cHello\u201d") == "\u201chello\u201d"
    assert exact_match("\u201cHello\u201d", "Hello") == 0.0
    # "“gold”" and "gold" are different tokens: 1 shared of 2 each -> F1 1/2
    assert f1("\u201cgold\u201d theme", "gold theme") == pytest.approx(0.5)
    # an em dash is a non-word character, so a neighbouring "the" is still a whole word and goes
    assert normalize_answer("the\u2014end") == "\u2014end"
    # accented letters are word characters, so "the" inside "éthe" is not a whole word
    assert normalize_answer("éthe") == "éthe"


# --- per-pair metrics ----------------------------------------------------------------------------------------

def test_partial_f1_hand_computed():
    # prediction tokens [denver, broncos, won], truth [denver, broncos, defeated, carolina]
    # precision 2/3, recall 2/4 -> F1 = 2PR/(P+R) = 4/7
    assert f1("the Denver Broncos won", "Denver Broncos defeated Carolina") == pytest.approx(4 / 7)
    assert f1("the Denver Broncos won", "Denver Broncos defeated Carolina", "2.0") == pytest.approx(4 / 7)
    assert exact_match("the Denver Broncos won", "Denver Broncos defeated Carolina") == 0.0


def test_f1_counts_repeated_tokens_once_per_match():
    # shared = min(3, 1) = 1: precision 1/3, recall 1 -> F1 1/2
    assert f1("go go go", "go") == pytest.approx(0.5)
    assert f1("Denver", "Carolina") == 0.0
    assert f1("Broncos Denver", "Denver Broncos") == 1.0  # bag of tokens: order does not matter


def test_empty_prediction_v11():
    assert f1("", "Denver") == 0.0
    # no common token -> 0 under v1.1 even when both sides normalize to nothing
    assert f1("", "") == 0.0
    assert f1("", "the") == 0.0
    assert f1("!!", "an") == 0.0
    # exact match only compares normalized strings, so it does score 1 there
    assert exact_match("", "the") == 1.0


def test_empty_prediction_v20():
    assert f1("", "", "2.0") == 1.0
    assert f1("", "the", "2.0") == 1.0
    assert f1("", "Denver", "2.0") == 0.0
    assert f1("Denver", "", "2.0") == 0.0


def test_unknown_version_refused():
    with pytest.raises(WorkbenchError, match="version"):
        f1("a", "b", "3.0")
    with pytest.raises(WorkbenchError, match="version"):
        score_squad([ex("q", "x")], {"q": "x"}, version="2")


# --- dataset scoring -----------------------------------------------------------------------------------------

def test_max_over_ground_truths():
    examples = [ex("q1", "Broncos", "Denver Broncos", "the Denver Broncos team")]
    s = score_squad(examples, {"q1": "Denver Broncos"})
    assert (s.exact_match, s.f1, s.n) == (100.0, 100.0, 1)
    # "Denver": F1 0 vs "Broncos", 2/3 vs "Denver Broncos", 1/2 vs "denver broncos team" -> 2/3
    s = score_squad(examples, {"q1": "Denver"})
    assert s.exact_match == 0.0
    assert s.f1 == pytest.approx(100 * 2 / 3)


def test_em_and_f1_maxima_are_taken_independently():
    examples = [ex("q1", "Santa Clara, California", "Levi's Stadium")]
    # tokens [levis, stadium, in, santa, clara]: vs [santa, clara, california] P 2/5 R 2/3 -> 1/2;
    # vs [levis, stadium] P 2/5 R 1 -> 4/7
    s = score_squad(examples, {"q1": "Levi's Stadium in Santa Clara"})
    assert s.exact_match == 0.0
    assert s.f1 == pytest.approx(100 * 4 / 7)


def test_missing_prediction_scores_zero_and_extra_predictions_ignored():
    examples = [ex("q1", "Denver Broncos"), ex("q2", "Carolina Panthers")]
    s = score_squad(examples, {"q1": "denver broncos", "q9": "anything"})
    assert (s.exact_match, s.f1, s.n) == (50.0, 50.0, 2)
    s = score_squad(examples, {})
    assert (s.exact_match, s.f1, s.n) == (0.0, 0.0, 2)


def test_empty_prediction_in_score_squad_v11_vs_v20():
    examples = [ex("q1", "The", "Broncos")]
    # v1.1: "" equals normalized "The" (EM 1), but F1 is 0 against both truths
    s = score_squad(examples, {"q1": ""}, "1.1")
    assert (s.exact_match, s.f1) == (100.0, 0.0)
    # v2.0: "The" normalizes to "" and is dropped from the golds, leaving only "Broncos"
    s = score_squad(examples, {"q1": ""}, "2.0")
    assert (s.exact_match, s.f1) == (0.0, 0.0)
    assert (s.has_ans_n, s.no_ans_n) == (1, None)


def test_v11_score_and_json_have_no_breakdown():
    s = score_squad([ex("q1", "Denver")], {"q1": "Denver"})
    assert s == SquadScore(exact_match=100.0, f1=100.0, n=1)
    assert s.to_json() == {"exact_match": 100.0, "f1": 100.0, "n": 1}


def test_v20_has_ans_no_ans_breakdown():
    examples = [
        ex("q1", "Denver Broncos"),                    # exact: EM 1, F1 1
        ex("q2", "Denver Broncos defeated Carolina"),  # partial: EM 0, F1 4/7
        ex("q3", impossible=True),                     # abstains correctly: EM 1, F1 1
        ex("q4", impossible=True),                     # answers an unanswerable: EM 0, F1 0
    ]
    preds = {"q1": "Denver Broncos", "q2": "the Denver Broncos won", "q3": "", "q4": "Carolina"}
    s = score_squad(examples, preds, "2.0")
    assert s.n == 4
    assert s.exact_match == 50.0
    assert s.f1 == pytest.approx(100 * (1 + 4 / 7 + 1 + 0) / 4)  # 450/7 = 64.2857...
    assert s.has_ans_n == 2 and s.no_ans_n == 2
    assert s.has_ans_exact == 50.0
    assert s.has_ans_f1 == pytest.approx(100 * (1 + 4 / 7) / 2)  # 550/7 = 78.5714...
    assert s.no_ans_exact == 50.0
    assert s.no_ans_f1 == 50.0
    assert set(s.to_json()) == {"exact_match", "f1", "n", "has_ans_exact", "has_ans_f1", "has_ans_n",
                                "no_ans_exact", "no_ans_f1", "no_ans_n"}
    assert s.to_json()["no_ans_n"] == 2


def test_v20_empty_group_is_none_and_left_out_of_json():
    s = score_squad([ex("q1", "Denver")], {"q1": "Denver"}, "2.0")
    assert (s.has_ans_exact, s.has_ans_f1, s.has_ans_n) == (100.0, 100.0, 1)
    assert (s.no_ans_exact, s.no_ans_f1, s.no_ans_n) == (None, None, None)
    assert s.to_json() == {"exact_match": 100.0, "f1": 100.0, "n": 1,
                           "has_ans_exact": 100.0, "has_ans_f1": 100.0, "has_ans_n": 1}
    s = score_squad([ex("q1", impossible=True)], {"q1": "x"}, "2.0")
    assert (s.exact_match, s.f1, s.has_ans_n, s.no_ans_n, s.no_ans_exact) == (0.0, 0.0, None, 1, 0.0)


def test_bad_inputs_refused():
    with pytest.raises(WorkbenchError, match="empty"):
        score_squad([], {})
    with pytest.raises(WorkbenchError, match="no ground-truth"):
        score_squad([ex("q1", impossible=True)], {"q1": ""}, "1.1")
    with pytest.raises(WorkbenchError, match="not a string"):
        score_squad([ex("q1", "x")], {"q1": None})


# --- real dev set --------------------------------------------------------------------------------------------

@pytest.mark.shared
def test_dev_set_first_ground_truth_scores_100():
    with open(DEV, encoding="utf-8") as f:
        data = json.load(f)["data"]
    examples = [ex(qa["id"], *(a["text"] for a in qa["answers"]))
                for article in data for para in article["paragraphs"] for qa in para["qas"]]
    preds = {e.qid: e.answers[0].text for e in examples}
    s = score_squad(examples, preds)
    assert (s.exact_match, s.f1, s.n) == (100.0, 100.0, 10570)
    s2 = score_squad(examples, preds, "2.0")
    assert (s2.exact_match, s2.f1, s2.n, s2.has_ans_n, s2.no_ans_n) == (100.0, 100.0, 10570, 10570, None)
