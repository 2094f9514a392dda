"""Same-subject probes: what else the model says about an edit's subject, kept as it was.

A routed block opens on its subject (routing.py), so without more it acts on every question about
that subject, not only on the edited relation. When an edit arrives, the editor asks the model as
it stands about the same subject with other relations (a built-in list of common ones, written for
this project, most in two wordings) and trains the edit's block to leave those answers unchanged:
BaFT's locality with negatives that share the subject, which random unrelated prompts never do.
Relations that read like the edited one are left out, since there the new answer is wanted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# The probe group (`data.Probe.group`) of the prompts the editor makes itself.
SUBJECT_PROBE_GROUP = "Subject_Probes"


@dataclass(frozen=True)
class Relation:
    template: str  # with {subject}
    # Words that mark a prompt about this relation (lower case, matched at a word start): an
    # edit whose prompt has one edits this relation, so the relation is no probe for it.
    markers: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    # People
    Relation("{subject} was born in the city of", ("born", "birth")),
    Relation("The place where {subject} died is", ("died", "death", "dead", "passed away", "burial", "buried")),
    Relation("{subject} holds citizenship of", ("citizen", "nationality", "national")),
    Relation("By profession, {subject} is a", ("occupation", "profession", "job", "career", "works as", "work as")),
    Relation("The gender of {subject} is", ("gender", "sex")),
    Relation("{subject} speaks the language", ("language", "tongue", "speak", "spoke")),
    Relation("{subject} works for", ("employer", "works for", "work for", "worked for", "employ")),
    Relation("{subject} was educated at", ("educat", "studied", "school", "university", "alma mater", "college")),
    Relation("{subject} is married to", ("spouse", "married", "wife", "husband")),
    Relation("The father of {subject} is", ("father", "parent", "son of", "daughter of")),
    Relation("The mother of {subject} is", ("mother", "parent", "son of", "daughter of")),
    Relation("A child of {subject} is", ("child", "son", "daughter")),
    Relation("A sibling of {subject} is", ("sibling", "brother", "sister")),
    Relation("{subject} received the award", ("award", "prize", "won", "honour", "honor")),
    Relation("The political party of {subject} is", ("party", "politic")),
    Relation("The position held by {subject} is", ("position", "office", "title", "role")),
    Relation("The field of work of {subject} is", ("field", "discipline", "work in", "works in", "expert")),
    Relation("{subject} plays for the team", ("team", "club", "plays for", "played for", "league")),
    Relation("The religion of {subject} is", ("religion", "religious", "faith", "believ")),
    # Organisations, places, works
    Relation("{subject} was founded by", ("found", "creat", "establish")),
    Relation("The headquarters of {subject} are in", ("headquarter", "located", "location", "based in", "seat")),
    Relation("{subject} is a part of", ("member", "part of", "belongs", "associated")),
    Relation("The capital city of {subject} is", ("capital",)),
    Relation("{subject} is in the country", ("country", "nation")),
    Relation("The continent of {subject} is", ("continent",)),
    Relation("{subject} was created by the author", ("author", "writer", "wrote", "written", "creat")),
    Relation("The director of {subject} is", ("director", "directed")),
    Relation("{subject} is a work in the genre of", ("genre", "style", "movement")),
    Relation("The original broadcaster of {subject} is", ("network", "broadcast", "channel", "aired")),
    Relation("{subject} is followed by", ("follow", "succeed", "successor", "next")),
    # The same relations asked as "The <property> of {subject} is", the form questions built from
    # Wikidata's property labels take: at the layer the relation check reads, a prompt is nearer
    # a probe worded like it than one worded otherwise, and without these a question of that form
    # about another relation was nearer the edit's own prompt (when worded so) than any probe.
    Relation("The name of the country of citizenship of {subject} is", ("citizen", "nationality", "national")),
    Relation("The occupation of {subject} is", ("occupation", "profession", "job", "career", "works as", "work as")),
    Relation("The place of birth of {subject} is", ("born", "birth")),
    Relation("The place of death of {subject} is", ("died", "death", "dead", "passed away", "burial", "buried")),
    Relation("The name of the employer of {subject} is", ("employer", "works for", "work for", "worked for", "employ")),
    Relation(
        "The name of the alma mater of {subject} is",
        ("educat", "studied", "school", "university", "alma mater", "college"),
    ),
    Relation("The name of the spouse of {subject} is", ("spouse", "married", "wife", "husband")),
    Relation("The name of the child of {subject} is", ("child", "son", "daughter")),
    Relation("The name of the award {subject} won is", ("award", "prize", "won", "honour", "honor")),
    Relation("The name of the founder of {subject} is", ("found", "creat", "establish")),
    Relation("The name of the country which {subject} is associated with is", ("country", "nation")),
    Relation("The official language of {subject} is", ("language", "tongue", "speak", "spoke")),
    Relation("The name of the league which {subject} plays in is", ("team", "club", "plays for", "played for", "league")),
    Relation("The genre of {subject} is", ("genre", "style", "movement")),
    Relation("The author of {subject} is", ("author", "writer", "wrote", "written", "creat")),
    Relation("{subject} follows", ("follow", "succeed", "successor", "next")),
)


def _mentions(prompt: str, marker: str) -> bool:
    return re.search(r"\b" + re.escape(marker), prompt) is not None


def probe_prompts(prompt: str, subject: str | None, limit: int) -> list[str]:
    """Up to `limit` prompts about `subject` with relations other than the one `prompt` asks
    about, in the list's order (none without a subject, or a subject the prompt does not name)."""
    if not subject or not subject.strip() or subject not in prompt or limit <= 0:
        return []
    rest = prompt.replace(subject, " ").lower()
    out = []
    for relation in RELATIONS:
        if any(_mentions(rest, marker) for marker in relation.markers):
            continue
        out.append(relation.template.format(subject=subject.strip()))
        if len(out) == limit:
            break
    return out
