"""Scorers on hand-made replies in each real MedTuned format, with exact expected numbers."""

import pytest

from medtune.eval import scorers
from medtune.eval.scorers import labels, ner, qa, text
from medtune.data.sources import FAMILIES

GOLD_NER = "Lithium : B\ntoxicity : O\ncaused : O\nacute : B\nrenal : I\nfailure : I\n. : O"


def _retag(gold: str, tags: str) -> str:
    return "\n".join(f"{line.rsplit(' : ', 1)[0]} : {tag}" for line, tag in zip(gold.split("\n"), tags.split()))


def test_ner_gold_scores_one_and_all_o_scores_zero():
    assert scorers.score("ner", [GOLD_NER], [GOLD_NER])["entity_f1"] == 1.0
    all_o = scorers.score("ner", [GOLD_NER], [_retag(GOLD_NER, "O O O O O O O")])
    assert all_o["entity_f1"] == 0.0 and all_o["entity_recall"] == 0.0 and all_o["primary"] == "entity_f1"


def test_ner_spans_are_strict():
    # "acute renal" only: a partial span is wrong (FP and FN); Lithium right: P = 1/2, R = 1/2.
    partial = ner.score_ner([GOLD_NER], [_retag(GOLD_NER, "B O O B I O O")])
    assert partial["entity_precision"] == partial["entity_recall"] == partial["entity_f1"] == 0.5
    # An entity that starts with I is no entity in strict IOB2 (seqeval's default mode would count it).
    starts_inside = ner.score_ner([GOLD_NER], [_retag(GOLD_NER, "B O O I I I O")])
    assert starts_inside == pytest.approx({"entity_precision": 1.0, "entity_recall": 0.5, "entity_f1": 2 / 3,
                                           "n_misaligned_lines": 0, "n_extra_lines": 0})


def test_ner_misaligned_lines_are_wrong_not_skipped():
    dropped_first = "\n".join(GOLD_NER.split("\n")[1:])  # every line one position early
    scores = ner.score_ner([GOLD_NER], [dropped_first])
    # The shifted "acute : B / renal : I / failure : I" sit at positions 2-4: one false positive entity.
    assert scores == {"entity_precision": 0.0, "entity_recall": 0.0, "entity_f1": 0.0,
                      "n_misaligned_lines": 7, "n_extra_lines": 0}
    garbage = ner.score_ner([GOLD_NER], ["The entities are Lithium and acute renal failure."])
    assert garbage["entity_f1"] == 0.0 and garbage["n_misaligned_lines"] == 7



def test_ner_extra_lines_are_wrong_predictions():
    extra = ner.score_ner([GOLD_NER], [GOLD_NER + "\nextra : B\nmore : O"])  # one more entity: a false positive
    assert extra == pytest.approx({"entity_precision": 2 / 3, "entity_recall": 1.0, "entity_f1": 0.8,
                                   "n_misaligned_lines": 0, "n_extra_lines": 2})
    looping = ner.score_ner([GOLD_NER], ["\n".join([GOLD_NER] * 10)])  # 2 right entities, 18 repeated ones
    assert looping == pytest.approx({"entity_precision": 0.1, "entity_recall": 1.0, "entity_f1": 2 / 11,
                                     "n_misaligned_lines": 0, "n_extra_lines": 63})


def test_ner_typed_i2b2_tags_html_entities_and_case():
    gold = "Patient : O\n&apos;s : O\nchest : B-PROBLEM\npain : I-PROBLEM\nimproved : O\non : O\nmorphine : B-TREATMENT"
    pred = "Patient : O\n's : O\nchest : b-problem\npain : I-PROBLEM\nimproved : O\non : O\nmorphine : B-TEST"
    scores = ner.score_ner([gold], [pred])  # the problem is right (the apostrophe aligns), the treatment mistyped
    assert scores["entity_precision"] == scores["entity_recall"] == 0.5 and scores["n_misaligned_lines"] == 0


def test_ner_micro_average_over_rows():
    other = "Mutations : O\nin : O\nBRCA1 : O\ncause : O\nbreast : B\ncancer : I\n. : O"
    scores = ner.score_ner([GOLD_NER, other], [GOLD_NER, _retag(other, "O O O O O O O")])
    assert scores["entity_precision"] == 1.0 and scores["entity_recall"] == pytest.approx(2 / 3)
    assert scores["entity_f1"] == pytest.approx(0.8)


def test_relations_negatives_are_never_true_positives():
    golds = ["TrIP", "TeRP", "No Relations", "Positive", "Negative"]
    everywhere_negative = labels.score_relations(golds, ["No Relations"] * 5)
    assert everywhere_negative == {"micro_precision": 0.0, "micro_recall": 0.0, "micro_f1": 0.0, "accuracy": 0.2}
    preds = ["The relation is TrIP.", "TeCP", "No relation", "positive", "I am not sure"]
    # TP 2 (TrIP, Positive); FP 1 (TeCP); FN 1 (TeRP); accuracy 4/5 (No relation reads as No Relations)
    assert labels.score_relations(golds, preds) == pytest.approx(
        {"micro_precision": 2 / 3, "micro_recall": 2 / 3, "micro_f1": 2 / 3, "accuracy": 0.6})
    assert labels.read_relation("a pip of an orange") is None  # codes are case-sensitive


def test_relations_wrong_code_is_fp_and_fn():
    assert labels.score_relations(["TrAP"], ["TrCP"]) == {"micro_precision": 0.0, "micro_recall": 0.0,
                                                          "micro_f1": 0.0, "accuracy": 0.0}


def test_nli_accuracy_and_macro_f1():
    golds = ["Entailment", "Entailment", "Contradiction", "Neutral"]
    preds = ["entailment", "The answer is Neutral.", "", "Neutral"]
    # Entailment: TP1 FN1 -> 2/3; Contradiction: FN1 -> 0; Neutral: TP1 FP1 -> 2/3
    assert labels.score_nli(golds, preds) == pytest.approx({"accuracy": 0.5, "macro_f1": 4 / 9})


def test_hallmarks_order_abbreviations_and_none():
    golds = ["Activating invasion & metastasis (IM), Evading growth suppressors (GS)", "None",
             "Resisting cell death (CD)", "Genome instability & mutation (GI)"]
    preds = ["Evading growth suppressors (GS), Activating invasion & metastasis (IM)",  # other order: exact
             "None",
             "CD, PS",                                                                # abbreviations; PS is wrong
             "genomic instability and mutation; it also talks about diet"]            # HoC's own name + junk
    scores = labels.score_hallmarks(golds, preds)
    # pairs: TP 4 (IM, GS, CD, GI), FP 1 (PS), FN 0; exact sets: rows 1 and 2; row 4 has an unreadable item
    # macro over IM, GS, CD, GI, PS: 1, 1, 1, 1, 0
    assert scores == pytest.approx({"micro_precision": 0.8, "micro_recall": 1.0, "micro_f1": 8 / 9,
                                    "macro_f1": 0.8, "exact_set_accuracy": 0.5})


def test_medmcqa_option_letter():
    gold = "###Rationale: Protamine binds heparin.\n\n###Answer: OPTION B IS CORRECT."
    right = qa.score_qa([gold], ["###Rationale: Protamine binds heparin.\n\n###Answer: OPTION B IS CORRECT."])
    wrong = qa.score_qa([gold], ["###Rationale: Protamine binds heparin.\n\n###Answer: OPTION D IS CORRECT."])
    assert right["medmcqa_accuracy"] == 1.0 and wrong["medmcqa_accuracy"] == 0.0
    assert right["rougeL_f"] == wrong["rougeL_f"] == 1.0  # the rationale itself is the same
    assert qa.option("option c is correct, because ...") == "C" and qa.option("C") is None


def test_pubmedqa_and_umls():
    golds = ["Patients mobilised early left sooner.\n\n###Answer: yes", "No benefit was found.\n\n###Answer: no",
             "Metformin may treat type 2 diabetes mellitus.", "###Answer: OPTION A IS CORRECT."]
    preds = ["Patients mobilised early left sooner.\n\n###Answer: Yes", "No benefit.\n\n###Answer: maybe",
             "metformin treats diabetes", "###Answer: OPTION A IS CORRECT."]
    scores = scorers.score("qa", golds, preds)
    rouge = (1.0 + text.rouge_l("No benefit was found.", "No benefit.")
             + text.rouge_l("Metformin may treat type 2 diabetes mellitus.", "metformin treats diabetes")) / 3
    assert scores == pytest.approx({"n": 4, "primary": "answer_accuracy", "n_medmcqa": 1, "n_pubmedqa": 2,
                                    "n_rougeL": 3, "medmcqa_accuracy": 1.0, "pubmedqa_accuracy": 0.5,
                                    "answer_accuracy": 2 / 3, "rougeL_f": rouge, "answer_words": 19 / 4})
    assert rouge == pytest.approx((1 + 2 / 3 + 2 / 5) / 3)  # LCS 2: of 4 / 2 tokens, of 7 / 3 tokens


def test_qa_without_closed_answers_heads_with_rouge():
    scores = scorers.score("qa", ["What is dysphagia? Difficulty swallowing."], ["difficulty swallowing"])
    assert scores["primary"] == "rougeL_f" and "answer_accuracy" not in scores


@pytest.mark.parametrize("gold,pred,expected", [
    ("the cat sat on the mat", "THE  cat, sat on the MAT!", 1.0),
    ("a b c d", "a x c y", 0.5),
    ("a b c", "c a b x", 4 / 7),
    ("some answer", "", 0.0),
])
def test_rouge_l(gold, pred, expected):
    assert text.rouge_l(gold, pred) == pytest.approx(expected)


def test_dialogue_scores():
    scores = scorers.score("dialogue", ["a b c d", "x y"], ["a x c y", ""])
    assert scores == pytest.approx({"n": 2, "primary": "rougeL_f", "rougeL_f": 0.25, "token_f1": 0.25,
                                    "answer_words": 2.0})


def test_every_family_has_a_scorer_and_a_headline():
    assert set(scorers.SCORERS) == set(scorers.PRIMARY) == set(FAMILIES)
