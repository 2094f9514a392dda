"""Loaders of the public benchmark formats and EditRequest construction."""
from __future__ import annotations

import json

import pytest
from conftest import DATA

from baft_core.data import EditRequest, Probe, load_edits

ZSRE = DATA / "zsre" / "zsre_eval_portability_dev.json"
COUNTERFACT = DATA / "counterfact" / "counterfact_val.json"
RECENT = DATA / "knowedit" / "wiki_recent_dev.json"
WIKI_CF = DATA / "knowedit" / "wiki_counterfact_dev.json"
WIKIBIO = DATA / "knowedit" / "wikibio_dev.json"
MQUAKE = DATA / "mquake" / "mquake_hard_dev.json"
PIQA = DATA / "locality" / "piqa_valid.jsonl"


def test_zsre():
    edits = load_edits(ZSRE, "zsre", limit=5)
    assert len(edits) == 5
    raw = json.loads(ZSRE.read_text())[0]
    e = edits[0]
    assert e.prompt == raw["src"] and e.target == raw["alt"] and e.subject == raw["subject"]
    assert e.rephrases == [raw["rephrase"]]
    assert e.locality == [Probe(raw["loc"], raw["loc_ans"])]
    assert e.portability == [Probe(raw["portability"]["New Question"], raw["portability"]["New Answer"])]
    assert len(load_edits(ZSRE, "zsre")) == len(json.loads(ZSRE.read_text()))


def test_counterfact():
    edits = load_edits(COUNTERFACT, "counterfact", limit=3)
    raw = json.loads(COUNTERFACT.read_text())[0]
    e = edits[0]
    assert (e.prompt, e.target, e.subject) == (raw["prompt"], raw["target_new"], raw["subject"])
    assert e.rephrases == [raw["rephrase_prompt"]]
    assert e.locality == [Probe(raw["locality_prompt"], raw["locality_ground_truth"])]
    assert e.portability == []


@pytest.mark.parametrize("path", [RECENT, WIKI_CF], ids=["wiki_recent", "wiki_counterfact"])
def test_knowedit(path):
    edits = load_edits(path, "knowedit", limit=20)
    raws = json.loads(path.read_text())[:20]
    for e, raw in zip(edits, raws):
        assert e.prompt == raw["prompt"] and e.subject == raw["subject"]
        assert isinstance(e.target, str) and e.target.strip()
        assert all(isinstance(p, Probe) and p.prompt and p.answer for p in e.locality + e.portability)
        n_loc = sum(len(v) for v in (raw.get("locality") or {}).values())
        assert len(e.locality) <= n_loc
    # answers given as alias lists resolve to the first alias
    first = edits[0]
    raw = raws[0]
    if path == RECENT:
        assert first.locality[0] == Probe(raw["locality"]["Relation_Specificity"][0]["prompt"], "Cēsis", "Relation_Specificity")
    assert sum(len(e.locality) for e in edits) > 0


def test_unknown_format():
    with pytest.raises(ValueError, match=r"unknown data format 'convsent'.*counterfact.*knowedit.*mquake.*wikibio.*zsre"):
        load_edits(ZSRE, "convsent")


def test_wikibio():
    raw = json.loads(WIKIBIO.read_text())[0]
    e = load_edits(WIKIBIO, "wikibio", limit=1)[0]
    assert (e.prompt, e.target, e.subject) == (raw["text"], raw["labels"], raw["concept"])
    assert e.subject in e.prompt  # routing finds it
    specificity = raw["locality"]["Relation_Specificity"]
    assert [(p.prompt, p.group) for p in e.locality] == [(item["prompt"], "Relation_Specificity") for item in specificity]


def test_mquake_makes_each_rewrite_once_with_every_case_s_questions():
    """A case's rewrites are edits of their own (the cloze prompt, its question as a rephrase);
    rewrites that several cases share are made once, carrying the multi-hop questions of each."""
    cases = json.loads(MQUAKE.read_text())
    edits = load_edits(MQUAKE, "mquake")
    rewrites = {(r["prompt"].format(r["subject"]), r["target_new"]["str"]) for c in cases for r in c["requested_rewrite"]}
    assert len(edits) == len(rewrites) < sum(len(c["requested_rewrite"]) for c in cases)
    first = cases[0]["requested_rewrite"][0]
    e = edits[0]
    assert (e.prompt, e.target, e.subject) == (first["prompt"].format(first["subject"]), first["target_new"]["str"], first["subject"])
    assert e.rephrases == [first["question"]]
    hops = [p for edit in edits for p in edit.portability]
    assert len(hops) == sum(len(c["questions"]) for c in cases) and {p.group for p in hops} == {"multi_hop"}
    assert Probe(cases[0]["questions"][0], cases[0]["new_answer"], "multi_hop") in e.portability


def test_piqa_items_and_their_labels(tmp_path):
    from baft_core.downstream import load_piqa

    items = load_piqa(PIQA, limit=3)
    raw = json.loads(PIQA.read_text().splitlines()[0])
    assert len(items) == 3 and items[0].answers == [raw["sol1"], raw["sol2"]] and items[0].label in (0, 1)
    assert items[0].prompt == f"Question: {raw['goal']}\nAnswer:"
    broken = tmp_path / "piqa.jsonl"
    broken.write_text(PIQA.read_text().splitlines()[0] + "\n")
    (tmp_path / "piqa_labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match="1 items but 2 labels"):
        load_piqa(broken)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_edits(tmp_path / "absent.json", "zsre")


def test_wrong_format_names_the_record():
    with pytest.raises(ValueError, match=r"record 0 is not zsre format"):
        load_edits(COUNTERFACT, "zsre")
    with pytest.raises(ValueError, match=r"record 0 is not counterfact format"):
        load_edits(ZSRE, "counterfact")


def test_bad_record_later_in_file_and_json_lines(tmp_path):
    good = {"src": "Who wrote X?", "alt": "Y"}
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, good, {"src": "Q?", "alt": ""}]) + "\n")
    with pytest.raises(ValueError, match=r"record 2 is not a valid edit.*target is empty"):
        load_edits(path, "zsre")
    assert len(load_edits(path, "zsre", limit=2)) == 2
    assert len(load_edits(path, "zsre", skip_invalid=True)) == 2  # the empty target is left out
    path.write_text("\n".join(json.dumps(r) for r in [good, {"question": "Q?"}]) + "\n")
    with pytest.raises(ValueError, match=r"record 1 is not zsre format"):
        load_edits(path, "zsre", skip_invalid=True)  # a record of another format still fails
    path.write_text(json.dumps({"src": "Q?", "alt": "A"}))
    with pytest.raises(ValueError, match="expected a list"):
        load_edits(path, "zsre")


def test_from_triple():
    template = EditRequest.from_triple("Danielle Darrieux", "The mother tongue of {subject} is", "Japanese")
    assert template.prompt == "The mother tongue of Danielle Darrieux is"
    assert template.subject == "Danielle Darrieux" and template.target == "Japanese"
    phrase = EditRequest.from_triple("Danielle Darrieux", " was born in ", "Tokyo", rephrases=["r"])
    assert phrase.prompt == "Danielle Darrieux was born in" and phrase.rephrases == ["r"]
    with pytest.raises(ValueError, match="target is empty"):
        EditRequest.from_triple("Danielle Darrieux", "speaks", "")
    with pytest.raises(ValueError, match="subject is empty"):
        EditRequest.from_triple(" ", "speaks", "French")
    with pytest.raises(ValueError, match="bad relation template"):
        EditRequest.from_triple("X", "{subject} lives in {city}", "Paris")


def test_dict_round_trip():
    e = EditRequest("p", "t", locality=[{"prompt": "a", "answer": "b"}], portability=[Probe("c", "d")])
    assert e.locality == [Probe("a", "b")]
    assert EditRequest.from_dict(e.to_dict()) == e
