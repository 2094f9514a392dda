"""A subject's other spellings (names.py) and the route keys an edit leaves for them."""
from __future__ import annotations

from test_core_editor import make_editor

from baft_core import EditRequest
from baft_core.metrics import open_blocks
from baft_core.names import name_variants, without_diacritics, without_initials


def test_diacritics_are_dropped_and_ligatures_spelled_out():
    assert without_diacritics("Manuel Ramón Alarcón") == "Manuel Ramon Alarcon"
    assert without_diacritics("Kjær Wœrth Nygård Weiß") == "Kjaer Woerth Nygard Weiss"
    assert without_diacritics("맦") == "맦"  # a script without marks comes back as it was
    assert without_diacritics("Danielle Darrieux") == "Danielle Darrieux"


def test_middle_initials_between_names_are_dropped():
    assert without_initials("Jean H. Kim") == "Jean Kim"
    assert without_initials("Kit D Jernshøj") == "Kit Jernshøj"
    assert without_initials("Lasse H. J. Hansen") == "Lasse Hansen"
    assert without_initials("Thomas L. Ahern, Jr.") == "Thomas Ahern, Jr."
    for kept in ("S. W. Van Schaick", "Eustache I of Conflans", "Drei Klavierstücke, D. 946", "Study: A new method"):
        assert without_initials(kept) == kept


def test_variants_are_distinct_and_differ_from_the_subject():
    assert name_variants("César A. Romero") == ["Cesar A. Romero", "César Romero", "Cesar Romero"]
    assert name_variants("Jean H. Kim") == ["Jean Kim"]
    assert name_variants("Danielle Darrieux") == []


def test_an_edit_keys_its_subjects_other_spellings(tiny_sharp):
    """An edit of "Manuel Ramón Alarcón" also leaves keys for "Manuel Ramon Alarcon" (the
    prompt with that name and the name alone), which a question in that spelling opens; with
    `route_name_variants` off it leaves the subject's keys alone."""
    request = EditRequest("The employer of Manuel Ramón Alarcón is", "NASA", subject="Manuel Ramón Alarcón")
    counts = {}
    for variants in (False, True):
        ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8, route_name_variants=variants)
        try:
            ed.edit(request)
            counts[variants] = len(ed.interventions.router.keys)
            if variants:
                assert open_blocks(ed, ["The employer of Manuel Ramon Alarcon is"]).tolist() == [[True]]
        finally:
            ed.attachment.detach()
    assert counts[True] == counts[False] + 2


def test_adapters_saved_before_these_options_route_as_they_did(tiny_sharp, tmp_path):
    """An adapter whose config has none of `route_prefix_needed`, `route_name_variants`,
    `route_spelling_normalised` and `route_prefix_word` (saved before them) loads routing as it
    did: each key needs all its earlier subject tokens, wherever they stand, and spellings compare
    token ids."""
    import json

    from test_core_routing import EDITS, reloaded_in_older_format

    def older(metadata, tensors):
        dropped = ("route_prefix_needed", "route_name_variants", "route_spelling_normalised", "route_prefix_word")
        config = {k: v for k, v in json.loads(metadata["config"]).items() if k not in dropped}
        return {**metadata, "config": json.dumps(config)}, tensors

    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8)
    try:
        for request in EDITS:
            ed.edit(request)
        router = ed.interventions.router
        assert router.prefix_needed == 1 and router.spelling_normalised and router.prefix_word
        reloaded_in_older_format(ed, tmp_path, older)
        router = ed.interventions.router
        assert router.prefix_needed is None and not router.spelling_normalised and not router.prefix_word
    finally:
        ed.attachment.detach()
