"""Emergency-symptom triage: a table of messages with the level (and the rule) public guidance calls for."""

import pytest
import yaml

from medtune.inference.triage import RULES_FILE, Rules, triage_messages, triage_text

E, U, N = "emergency", "urgent", "none"

CASES = [
    # emergencies (NHS "When to call 999", NHS chest pain, AHA/ASA F.A.S.T., BE-FAST, NHS anaphylaxis, NIMH/988)
    ("Crushing chest pain spreading to my left arm, and I'm sweating", E, "chest_pain_red_flags"),
    ("I have chest pain and I'm really short of breath", E, "chest_pain_red_flags"),
    ("pain in the middle of my chest going into my jaw for 20 minutes", E, "chest_pain_red_flags"),
    ("It feels like an elephant is sitting on my chest", E, "chest_pressure"),
    ("tightness across my chest and I feel sick", E, "chest_pressure"),
    ("I think I'm having a heart attack", E, "heart_attack"),
    ("My dad's face is drooping on one side and he can't lift his right arm", E, "stroke_face"),
    ("my husband's speech is slurred all of a sudden", E, "stroke_speech"),
    ("I suddenly lost my balance and can't see out of my left eye", E, "stroke_balance_eyes"),
    ("her left arm went numb and weak an hour ago", E, "stroke_arm"),
    ("I can't breathe properly and my lips are turning blue", E, "breathing_difficulty"),
    ("My son is choking on a grape", E, "breathing_difficulty"),
    ("I cut my leg and the bleeding won't stop", E, "severe_bleeding"),
    ("I've been vomiting blood since this morning", E, "severe_bleeding"),
    ("my throat is swelling up after I ate peanuts", E, "anaphylaxis"),
    ("lips and tongue swollen after a bee sting, used my epipen", E, "anaphylaxis"),
    ("I want to kill myself", E, "suicide_self_harm"),
    ("I don't want to live anymore, everyone would be better off without me", E, "suicide_self_harm"),
    ("I took too many pills on purpose", E, "suicide_self_harm"),
    ("My grandmother collapsed and is unresponsive", E, "unconscious"),
    ("my daughter is having a seizure right now", E, "seizure"),
    ("He became suddenly confused and doesn't know where he is", E, "sudden_confusion"),
    ("the worst headache of my life came on suddenly", E, "thunderclap_headache"),
    ("fever and a rash that doesn't fade when I press a glass on it", E, "meningitis_sepsis"),
    ("I hit my head this morning and have been vomiting since", E, "head_injury"),
    ("my toddler drank bleach", E, "poisoning"),
    ("my baby is floppy and won't wake up properly", E, "baby_red_flags"),
    ("sudden severe stomach pain, I can barely stand", E, "severe_abdominal_pain"),
    # misspellings
    ("I cant breath", E, "breathing_difficulty"),
    ("cheast pain going down my arm", E, "chest_pain_red_flags"),
    ("I think I'm having a stoke", E, "stroke_named"),
    ("im feeling sucidal", E, "suicide_self_harm"),
    ("my mum is unconcious", E, "unconscious"),
    ("severe alergic reaction, throat is swolen", E, "anaphylaxis"),
    ("he had a siezure", E, "seizure"),
    ("his face is droopng and speech is slured", E, "stroke_face"),
    # urgent (NHS 111 / urgent GP)
    ("I've had some chest pain on and off today", U, "chest_pain"),
    ("I've been coughing up blood", U, "coughing_blood"),
    ("I get short of breath walking up stairs lately", U, "breathless"),
    ("there was blood in my urine this morning", U, "blood_in_urine_or_stool"),
    ("I'm 10 weeks pregnant and have some bleeding", U, "pregnancy_bleeding"),
    ("my 2 month old baby has a temperature of 38.5", U, "baby_fever"),
    ("I can't keep any fluids down and haven't peed since yesterday", U, "dehydration_vomiting"),
    ("I've had a high fever for 5 days", U, "high_fever"),
    # everyday complaints
    ("I have a sore throat and a mild fever since yesterday.", N, None),
    ("My knee hurts when I walk downstairs", N, None),
    ("What is the usual dose of paracetamol for adults?", N, None),
    ("I have a runny nose and I sneeze a lot", N, None),
    ("I was cooking dinner and got a small burn on my finger", N, None),
    ("My back is stiff after gardening", N, None),
    ("I feel a bit dizzy when I stand up too fast", N, None),
    ("I'm allergic to penicillin, what can I take for a cold?", N, None),
    ("I'm fit and healthy, how much exercise should I do?", N, None),
    ("the pain is on the right side of my knee", N, None),
    # negations
    ("No chest pain, just a cough", N, None),
    ("I have a cough but no chest pain and no shortness of breath", N, None),
    ("I'm not suicidal, just very tired", N, None),
    ("I don't want to die, I just want to sleep better", N, None),
    ("I never had a seizure", N, None),
    ("there is no bleeding and no swelling", N, None),
    ("denies chest pain or shortness of breath", N, None),
    # negation does not reach past its clause, and "not sure" is no negation
    ("No fever, but crushing chest pain spreading to my arm", E, "chest_pain_red_flags"),
    ("I'm not sure, but I think her face is drooping", E, "stroke_face"),
    ("I have no idea why my throat is swelling", E, "anaphylaxis"),
]


def test_the_table_is_large_and_covers_every_kind():
    assert len(CASES) >= 40
    kinds = {level for _, level, _ in CASES}
    assert kinds == {E, U, N}


@pytest.mark.parametrize("text, level, rule", CASES)
def test_triage_table(text, level, rule):
    result = triage_text(text)
    assert result.level == level, (text, result)
    if rule:
        assert rule in [m["id"] for m in result.matched]
    assert (result.notice == "") == (level == N)


def test_notices_and_crisis_advice():
    crisis = triage_text("I keep thinking about suicide")
    assert "988" in crisis.notice and "116 123" in crisis.notice and "emergency number" in crisis.notice
    urgent = triage_text("I've been coughing up blood")
    assert "111" in urgent.notice and "988" not in urgent.notice


def test_only_the_latest_user_message_counts():
    messages = [{"role": "system", "content": "I am a bot, call 999 for chest pain"},
                {"role": "user", "content": "I had crushing chest pain last week"},
                {"role": "assistant", "content": "Please call an ambulance"},
                {"role": "user", "content": "Thanks, what should I eat for breakfast?"}]
    assert triage_messages(messages).level == N
    assert triage_messages(messages[:2]).level == E


def test_every_rule_cites_a_source_with_a_url():
    data = yaml.safe_load(RULES_FILE.read_text())
    assert all(data["sources"][r["source"]]["url"].startswith("https://") for r in data["rules"])


@pytest.mark.parametrize("change, message", [
    (lambda d: d["rules"][0].update(level="critical"), "level must be one of"),
    (lambda d: d["rules"][0].update(source="somewhere"), "is not under sources"),
    (lambda d: d["rules"][0].update({"all": []}), "`all` must be a non-empty list"),
    (lambda d: d.pop("negation"), "needs the keys"),
])
def test_bad_rule_files_are_refused_with_the_file_and_rule(tmp_path, change, message):
    data = yaml.safe_load(RULES_FILE.read_text())
    change(data)
    path = tmp_path / "rules.yaml"
    with pytest.raises(ValueError, match=message) as err:
        Rules(data, path)
    assert str(path) in str(err.value)
