"""Per-family scorers on hand-made cases with known answers, including malformed predictions."""

import pytest

from medtune.eval import scorers as S


def test_normalize_and_tokens():
    assert S.normalize("  Activating   Invasion and Metastasis. ") == "activating invasion and metastasis"
    assert S.tokens("HPV-16, mainly!") == ["hpv", "16", "mainly"]


@pytest.mark.parametrize("gold,pred,expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat sat on the mat", "THE  cat, sat on the MAT!", 1.0),  # case, spacing, punctuation ignored
    ("a b c d", "a x c y", 0.5),  # LCS "a c": P = R = 2/4
    ("a b c d e f", "f e d c b a", 1 / 6),  # LCS 1: P = R = 1/6
    ("a b c", "c a b x", 4 / 7),  # LCS "a b": P = 2/4, R = 2/3 -> F = 4/7
    ("some answer", "", 0.0),
    ("", "", 0.0),
])
def test_rouge_l(gold, pred, expected):
    assert S.rouge_l(gold, pred) == pytest.approx(expected)


@pytest.mark.parametrize("gold,pred,expected", [
    ("dopamine", "Dopamine.", 1.0),
    ("a b c d", "d c b a", 1.0),  # a bag of tokens: order does not matter
    ("a a b", "a b b", 2 / 3),  # overlap 2 of 3 each way
    ("dopamine", "", 0.0),
    ("", "", 1.0),
    ("dopamine", "%%%###", 0.0),
])
def test_token_f1(gold, pred, expected):
    assert S.token_f1(gold, pred) == pytest.approx(expected)


def test_free_text_scores():
    scores = S.score_free_text(["a b c d", "x y"], ["a x c y", ""])
    assert scores == pytest.approx({"rougeL_f": 0.25, "token_f1": 0.25, "answer_words": 2.0})


def test_parse_entities_is_forgiving_about_format():
    text = " disease:  Pulmonary   Fibrosis \n- Chemical: Lithium.\n\ngarbage line\nGene:\n1. GENE: HTT"
    assert S.parse_entities(text) == {("disease", "pulmonary fibrosis"), ("chemical", "lithium"), ("gene", "htt")}
    assert S.parse_entities("None") == set()
    assert S.parse_entities("Disease: None") == set()
    assert S.parse_entities("") == set()


def test_ner_micro_f1():
    golds = ["Disease: pulmonary fibrosis\nDisease: bipolar disorder", "None", "Chemical: lithium",
             "Gene: FMR1"]
    preds = [
        "disease: Pulmonary fibrosis",  # partial list: 1 TP, 1 FN
        "Chemical: aspirin",  # spurious entity: 1 FP
        "CHEMICAL:   lithium  ",  # wrong case and extra spaces still match: 1 TP
        "I cannot find any genes.",  # garbage: 1 FN
    ]
    scores = S.score_ner(golds, preds)
    # TP 2, FP 1, FN 2 -> P 2/3, R 1/2, F1 4/7
    assert scores == pytest.approx({"entity_precision": 2 / 3, "entity_recall": 0.5, "entity_f1": 4 / 7})


def test_ner_wrong_type_is_both_fp_and_fn():
    assert S.score_ner(["Disease: lithium"], ["Chemical: lithium"])["entity_f1"] == 0.0
    assert S.score_ner(["None"], ["None"]) == {"entity_precision": 0.0, "entity_recall": 0.0, "entity_f1": 0.0}


def test_extract_label():
    labels = ["TrIP", "TrAP", "none"]
    assert S.extract_label(" trip. ", labels) == "trip"
    assert S.extract_label("The relation is TrAP (treatment administered).", labels) == "trap"
    assert S.extract_label("tripped over", labels) == "tripped over"  # whole words only
    assert S.extract_label("", labels) == ""


def test_relation_scores():
    golds = ["TrIP", "TrWP", "none", "none", "yes", "no"]
    preds = [
        "TrIP",  # TP
        "TrIP",  # wrong positive: FP and FN
        "",  # empty on a negative gold: wrong, but no FP/FN
        "No",  # "no" and "none" are the same negative class: correct
        "  YES.  ",  # TP
        "garbage",  # wrong on a negative gold, not a positive label: no FP
    ]
    scores = S.score_relations(golds, preds)
    # TP 2, FP 1, FN 1 -> P = R = F1 = 2/3; accuracy 3/6
    assert scores == pytest.approx({"micro_precision": 2 / 3, "micro_recall": 2 / 3, "micro_f1": 2 / 3,
                                    "accuracy": 0.5})


def test_relation_known_label_missing_from_gold_is_a_false_positive():
    scores = S.score_relations(["none", "TrIP"], ["The test conducted: TeCP", "none"])
    assert scores == pytest.approx({"micro_precision": 0.0, "micro_recall": 0.0, "micro_f1": 0.0, "accuracy": 0.0})


def test_nli_scores():
    golds = ["entailment", "entailment", "contradiction", "neutral"]
    preds = ["Entailment.", "The answer is neutral", "", "neutral"]
    scores = S.score_nli(golds, preds)
    # entailment: TP1 FN1 -> 2/3; contradiction: FN1 -> 0; neutral: TP1 FP1 -> 2/3
    assert scores == pytest.approx({"accuracy": 0.5, "macro_f1": (2 / 3 + 0 + 2 / 3) / 3})


def test_parse_label_set():
    assert S.parse_label_set("Resisting cell death,  tumor promoting Inflammation.\n") == {
        "resisting cell death", "tumor promoting inflammation"}
    assert S.parse_label_set("None") == set()
    assert S.parse_label_set("") == set()


def test_classification_scores():
    golds = ["A, B", "B", "C", "A"]
    preds = ["b ,a", "B, D", "", "A"]
    scores = S.score_classification(golds, preds)
    # exact sets: rows 1 and 4 -> 0.5
    # A: TP2 -> 1; B: TP2 -> 1; C: FN1 -> 0; D is not a gold label, so no class of its own
    assert scores == pytest.approx({"exact_set_accuracy": 0.5, "macro_f1": 2 / 3})


def test_classification_reads_labels_inside_wordy_items():
    golds = ["Resisting cell death, Inducing angiogenesis", "Inducing angiogenesis"]
    preds = ["The document is about: resisting cell death; also Inducing Angiogenesis.",
             "inducing angiogenesis, something else"]  # the unknown item breaks the exact set
    scores = S.score_classification(golds, preds)
    assert scores == pytest.approx({"exact_set_accuracy": 0.5, "macro_f1": 1.0})


def test_yes_no_maybe():
    assert S.yes_no_maybe("yes. The trial showed ...") == "yes"
    assert S.yes_no_maybe("Maybe") == "maybe"
    assert S.yes_no_maybe("Dopamine.") is None
    assert S.yes_no_maybe("nothing") is None


def test_qa_scores_split_closed_and_free_rows():
    golds = ["yes. The trial showed lower rates.", "no. No difference.", "maybe. Not significant.",
             "Dopamine.", "Protamine sulfate."]
    preds = ["Yes, because ...", "I think the answer is no", "", "dopamine", "heparin"]
    scores = S.score_qa(golds, preds)
    assert scores == pytest.approx({
        "n_yes_no_maybe": 3, "n_free_text": 2,
        "yes_no_maybe_accuracy": 2 / 3,
        "rougeL_f": 0.5, "token_f1": 0.5,
        "answer_words": (3 + 6 + 0 + 1 + 1) / 5,
    })


def test_qa_without_free_rows_omits_free_metrics():
    scores = S.score_qa(["yes"], ["no"])
    assert scores == {"n_yes_no_maybe": 1, "n_free_text": 0, "yes_no_maybe_accuracy": 0.0, "answer_words": 1.0}


def test_every_family_has_a_scorer():
    from medtune.eval.tasks import FAMILIES

    assert set(S.SCORERS) == set(FAMILIES)
