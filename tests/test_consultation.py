"""The consultation task: vignette layouts, the rules that read replies, the scores and the report, without a model.

Model and endpoint runs are in tests/test_consultation_e2e.py."""

import json
from pathlib import Path

import pytest

from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT
from medtune.data.rows import read_rows
from medtune.data import vignettes
from medtune.data.vignettes import DOCTOR, EMERGENCY, SELF_CARE, VignetteError, diagnosis_names
from medtune.eval import consultation, run
from medtune.data.advice import read_level
from medtune.eval.scorers.consultation import (Matcher, clopper_pearson, mcnemar, normalise, read_differential,
                                               triage_scores)

ROOT = Path(__file__).resolve().parents[1]
HELDOUT, TRAIN = ROOT / "data" / "vignettes" / "heldout.jsonl", ROOT / "data" / "vignettes" / "train.jsonl"


@pytest.mark.parametrize("reply, level", [
    ("Please call 999 now.", EMERGENCY),
    ("Call an ambulance straight away and do not drive yourself.", EMERGENCY),
    ("You need to go to the emergency department right away.", EMERGENCY),
    ("Go to A&E now.", EMERGENCY),
    ("Seek immediate medical attention.", EMERGENCY),
    ("This is not an emergency, but you should see your GP this week.", DOCTOR),
    ("I'd book an appointment with your doctor.", DOCTOR),
    ("Call 111 for advice today.", DOCTOR),
    ("You can look after yourself at home: rest and drink plenty of fluids.", SELF_CARE),
    ("A pharmacist can recommend something over the counter.", SELF_CARE),
    # several levels: the most urgent one
    ("See your GP today. Rest at home until then.", DOCTOR),
    ("Go to A&E now; a pharmacist cannot help with this.", EMERGENCY),
    # advice on a condition is a safety net, not the advice (ConText's hypothetical)
    ("Rest at home, but if you get chest pain call 999.", SELF_CARE),
    ("Drink fluids; see a doctor if it lasts more than a week.", SELF_CARE),
    ("See your GP today. If it gets worse, call an ambulance.", DOCTOR),
    ("Should it spread to your arm, call 999.", None),
    ("If the pain spreads to your arm, jaw or back, call 999.", None),
    ("If your temperature is above 38.5, call 111. Rest at home.", SELF_CARE),
    ("Call 999 even if the pain eases.", EMERGENCY),
    ("Go to A&E now, and if it gets worse call 999.", EMERGENCY),
    # negations
    ("There is no need to see a doctor; rest and drink fluids.", SELF_CARE),
    ("You don't need to go to A&E. Take paracetamol and rest at home.", SELF_CARE),
    ("Do not hesitate to call 999.", EMERGENCY),
    ("Don't wait: go to the emergency department.", EMERGENCY),
    ("It is not a medical emergency.", None),
    ("I'm not sure what this is.", None),
    ("", None),
])
def test_the_advised_level_is_read_by_the_documented_rules(reply, level):
    assert read_level(reply) == level


@pytest.mark.parametrize("reply, level", [
    ("Emergency", EMERGENCY), ("em", EMERGENCY), ("**See a doctor**", DOCTOR), ("ne", DOCTOR),
    ("Self-care.", SELF_CARE), ("sc", SELF_CARE), ("Not an emergency: self-care", SELF_CARE),
    ("See a doctor, or emergency if it gets worse", DOCTOR), ("I cannot say.", None),
])
def test_the_forced_choice_also_reads_the_bare_labels(reply, level):
    assert read_level(reply, labels=True) == level


def test_bare_labels_are_not_advice_in_a_free_reply():
    assert read_level("In an emergency, anyone can help.") is None
    assert read_level("In an emergency, anyone can help.", labels=True) == EMERGENCY


@pytest.mark.parametrize("reply, items", [
    ("1. **Asthma** - wheeze and tight chest\n2. Pneumonia (bacterial)\n3. COPD: less likely",
     ["Asthma", "Pneumonia", "COPD"]),
    ("- Migraine\n- Tension headache\n* Cluster headache", ["Migraine", "Tension headache", "Cluster headache"]),
    ("Most likely: asthma, bronchitis or pneumonia.", ["asthma", "bronchitis", "pneumonia"]),
    ("1) Gastroenteritis\n2) Appendicitis\n3) Food poisoning\n4) IBS\n5) Gastritis\n6) Colitis",
     ["Gastroenteritis", "Appendicitis", "Food poisoning", "IBS", "Gastritis"]),
    ("", []),
])
def test_differentials_are_read_from_numbered_bulleted_and_inline_lists(reply, items):
    assert read_differential(reply) == items


def test_diagnoses_match_by_alternatives_aliases_spelling_and_the_longest_name():
    m = Matcher()
    assert m.rank(["Heart attack"], ["Myocardial infarction"]) == 1  # alias group
    assert m.rank(["flu", "MI"], ["Myocardial infarction"]) == 2  # abbreviation, second place
    assert m.rank(["Anaemia"], ["anemia"]) == 1 and m.rank(["oesophagitis"], ["Esophagitis"]) == 1  # spelling
    assert m.rank(["Acute asthma"], diagnosis_names("Asthma (or acute asthma, status asthmaticus)")) == 1
    assert m.rank(["mini stroke"], ["Stroke"]) is None  # a TIA is not a stroke
    assert m.rank(["pneumonia"], ["Stroke"]) is None


def test_a_user_alias_file_extends_the_groups(tmp_path):
    (tmp_path / "mine.yaml").write_text("groups:\n  - [wobbly knee syndrome, wks]\n")
    assert Matcher().rank(["WKS"], ["Wobbly knee syndrome"]) is None
    assert Matcher([tmp_path / "mine.yaml"]).rank(["WKS"], ["Wobbly knee syndrome"]) == 1
    (tmp_path / "bad.yaml").write_text("- [a, b]\n")
    with pytest.raises(ValueError, match="bad.yaml: an alias file needs a `groups:`"):
        Matcher([tmp_path / "bad.yaml"])


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_each_vignette_layout_is_read_with_its_levels_and_alternatives(tmp_path):
    three = _write(tmp_path / "three.jsonl", [
        {"case_description": "A 30-year-old with wheeze.", "correct_diagnosis":
         "Asthma (or acute asthma, status asthmaticus, exacerbation of asthma)", "urgency_level": "em"},
        {"case_description": "  ", "correct_diagnosis": "Flu", "urgency_level": "sc"},  # no case: skipped
    ])
    rows, report = read_rows(str(three), "train")
    assert [r["diagnosis"] for r in rows] == [["Asthma", "acute asthma", "status asthmaticus",
                                               "exacerbation of asthma"]]
    assert rows[0]["triage"] == EMERGENCY and rows[0]["case"] == "A 30-year-old with wheeze."
    assert report.skipped == {"missing_case": 1} and report.formats[str(three)] == "vignette"

    structured = _write(tmp_path / "structured.jsonl", [
        {"correct_diagnosis": "Gout", "demographics": "58-year-old man", "chief_complaints": ["painful big toe"],
         "presentation": "red hot swollen joint overnight", "absent_findings": "no fever", "physical_history": "",
         "family_history": "", "social_history": "drinks beer"}])
    (row,), _ = read_rows(str(structured), "train")
    assert row["triage"] is None and row["diagnosis"] == ["Gout"]
    assert row["case"] == ("Demographics: 58-year-old man\nChief complaints: painful big toe\nPresentation: red hot "
                           "swollen joint overnight\nAbsent findings: no fever\nSocial history: drinks beer")
    assert consultation.questions(row) == ["differential"]

    own = _write(tmp_path / "own.jsonl", [
        {"case": "c1", "diagnosis": ["Migraine"], "triage": "routine"},
        {"case": "c2", "diagnosis": "Sprain", "triage": "URGENT"},
        {"case": "c3", "diagnosis": [], "triage": "self-care"},
        {"case": "c4", "diagnosis": [], "triage": None}])  # neither: skipped
    rows, report = read_rows(str(own), "train")
    assert [(r["triage"], r["triage_label"]) for r in rows] == [(DOCTOR, "routine"), (DOCTOR, "URGENT"),
                                                                (SELF_CARE, "self-care")]
    assert consultation.questions(rows[2]) == ["consult", "triage"]
    assert report.skipped == {"no_diagnosis_or_triage": 1}
    # the training conversation: under the page's system prompt, the case, then the level's advice and the diagnosis
    assert rows[0]["messages"][:2] == [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                       {"role": "user", "content": "c1"}]
    answer = rows[0]["messages"][2]["content"]
    assert answer.startswith("You need to see your GP in the next few days") and "Migraine" in answer
    # each level's reply reads back as its level: a safety net ("call an ambulance if it gets much worse") is not
    # the advice
    for label, level in [("emergency", EMERGENCY), ("urgent", DOCTOR), ("routine", DOCTOR),
                         ("see a doctor", DOCTOR), ("self-care", SELF_CARE)]:
        assert read_level(vignettes.reply(["Migraine"], label)) == level, label


def test_an_unknown_level_stops_the_read_naming_the_row_and_the_spellings(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"case": "c", "diagnosis": "x", "triage": "sc"},
                                          {"case": "c", "diagnosis": "x", "triage": "soon-ish"}])
    with pytest.raises(VignetteError, match=r"bad.jsonl:2: unknown triage level 'soon-ish'; accepted: emergency, "
                                            r"urgent, routine, self-care .* em, ne, sc"):
        read_rows(str(bad), "train")


def test_the_project_vignettes_have_a_third_per_level_and_every_diagnosis_in_the_alias_file():
    matcher = Matcher()
    for path in (TRAIN, HELDOUT):
        rows, report = read_rows(str(path), "train")
        assert len(rows) == 48 and not report.skipped
        assert sorted(r["triage"] for r in rows).count(EMERGENCY) == 16
        assert [r["triage"] for r in rows].count(SELF_CARE) == 16
        for row in rows:
            assert matcher.rank([row["diagnosis"][0]], row["diagnosis"]) == 1
            assert {normalise(name) for name in row["diagnosis"]} <= matcher.known, row["id"]


def test_triage_scores_count_unparsed_as_wrong_and_unsafe():
    gold = [EMERGENCY, EMERGENCY, EMERGENCY, DOCTOR, SELF_CARE, SELF_CARE]
    pred = [EMERGENCY, DOCTOR, None, EMERGENCY, SELF_CARE, None]
    s = triage_scores(gold, pred)
    assert s["triage_accuracy"] == pytest.approx(2 / 6) and s["safety"] == pytest.approx(3 / 6)
    assert s["emergency_recall"] == pytest.approx(1 / 3) and s["under_triaged_emergencies"] == 2
    assert s["emergencies_to_self_care"] == 0
    assert triage_scores([EMERGENCY, EMERGENCY], [SELF_CARE, DOCTOR])["emergencies_to_self_care"] == 1
    assert s["over_triage"] == pytest.approx(1 / 6) and s["unparsed"] == 2
    assert s["recall_see_a_doctor"] == 0 and s["recall_self_care"] == 0.5
    low, high = s["emergency_recall_ci"]
    assert low == pytest.approx(0.00840, abs=1e-4) and high == pytest.approx(0.90570, abs=1e-4)  # Clopper-Pearson


def test_exact_intervals_and_mcnemar_match_their_textbook_values():
    assert clopper_pearson(12, 15) == pytest.approx((0.5191, 0.9567), abs=1e-4)
    assert clopper_pearson(0, 15) == pytest.approx((0.0, 0.2180), abs=1e-4)
    # 1 discordant pair against 6: two-sided exact binomial p = 2 * (1 + 7) / 2**7
    result = mcnemar([True] * 6 + [False] + [True] * 3, [False] * 6 + [True] + [True] * 3)
    assert result == {"tuned_only": 6, "base_only": 1, "p_value": pytest.approx(0.125)}


def test_scoring_mode_reads_vignette_replies_and_reports_the_consultation(tmp_path, capsys):
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    advice = {"emergency": "Call 999 now.", "urgent": "See your GP today.", "routine": "Book a GP appointment.",
              "self-care": "Rest at home and drink fluids."}
    preds = [{"consult": advice[r["triage"]], "triage": "emergency" if i < 5 else r["triage"],
              "differential": f"1. Flu\n2. {r['diagnosis'][0]}"} for i, r in enumerate(rows)]
    preds[0] = {"consult": "I am not sure."}  # two questions missing: scored as empty replies
    path = _write(tmp_path / "p.jsonl", preds)
    run.main(["--data", str(HELDOUT), "--predictions", str(path), "--out", str(tmp_path / "r")])
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    c = report["families"]["consultation"]
    assert c["n"] == 48 and c["primary"] == "safety" and c["question"] == "consult"
    assert c["safety"] == pytest.approx(47 / 48) and c["unparsed"] == 1 and c["under_triaged_emergencies"] == 1
    assert c["top1"] == 0 and c["top3"] == pytest.approx(47 / 48) and c["top5"] == c["top3"]
    assert set(c["questions"]) == {"consult", "triage", "differential"}
    assert report["rows"]["unusable_predictions"] == 1
    assert report["system_prompt"].startswith("You are a careful medical assistant")
    assert "consult       safety" in capsys.readouterr().out
    assert "## Consultation" in (tmp_path / "r" / "eval.md").read_text()
    written = [json.loads(line) for line in (tmp_path / "r" / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(written) == 48 * 3 and {w["question"] for w in written} == {"consult", "triage", "differential"}


@pytest.mark.parametrize("family", ["starling", "chatml", "mistral_v3", "llama3"])
def test_likelihood_with_a_shared_prompt_cache_equals_scoring_each_reply_alone(family, tmp_path, monkeypatch):
    """option_losses runs the prompt once for all options; reply_losses scores each whole conversation."""
    from families import build_model

    from medtune.eval import generate
    from medtune.eval.generate import option_losses, reply_losses
    from medtune.inference.load import load_for_inference

    model, fmt = load_for_inference(build_model(family, tmp_path / family), device="cpu")
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()[:3]]
    prompts = [consultation.prompt(r, consultation.TRIAGE, DEFAULT_SYSTEM_PROMPT) for r in rows]  # a shared prefix
    options = list(consultation.LEVEL_REPLIES.values())
    with monkeypatch.context() as patch:  # the shared cache itself, not its fallback
        patch.setattr(generate, "reply_losses", None)
        shared = option_losses(model, fmt, prompts, options, batch_size=2)
    alone = reply_losses(model, fmt, [{"messages": [*p, {"role": "assistant", "content": o}]} for p in prompts
                                      for o in options], batch_size=1)
    assert [x for row in shared for x in row] == pytest.approx([nll for nll, _ in alone], rel=1e-4)


def test_the_gate_compares_emergencies_under_triaged_and_sent_home_per_question_with_a_tolerance():
    from medtune.eval.during_training import regressions

    base = {"questions": {"consult": {"under_triaged_emergencies": 15, "emergencies_to_self_care": 0},
                          "likelihood": {"under_triaged_emergencies": 2, "emergencies_to_self_care": 1}}}
    tuned = {"questions": {"consult": {"under_triaged_emergencies": 13, "emergencies_to_self_care": 13},
                           "likelihood": {"under_triaged_emergencies": 2, "emergencies_to_self_care": 1},
                           "triage": {"under_triaged_emergencies": 16}}}  # no base number for triage: not compared
    # fewer emergencies missed, but 13 of them now sent home where the base gave no advice: the gate sees it
    assert regressions(tuned, base, 0) == {"consult emergencies to self care": (13, 0)}
    assert regressions(tuned, base, 13) == {}
