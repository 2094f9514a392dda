"""Same-subject probes: what else the model says about an edit's subject, kept as it was.

A routed block opens on its subject (routing.py), so without more it acts on every question about
that subject, not only on the edited relation. When an edit arrives, the editor puts the same
subject to other relations (a built-in list of common ones, written for this project, most in two
wordings) and the relation check keeps the edit's block shut on prompts that read like them
(relations.py): BaFT's locality with negatives that share the subject, which random unrelated
prompts never do. Relations that read like the edited one are left out, since there the new answer
is wanted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# The probe group (`data.Probe.group`) of the prompts the editor makes itself.
SUBJECT_PROBE_GROUP = "Subject_Probes"


@dataclass(frozen=True)
class Relation:
    template: str  # with {subject}
    # Patterns that mark a prompt about this relation (lower case, regular expressions matched at
    # a word start): an edit whose prompt has one edits this relation, so the relation is no probe
    # for it.
    markers: tuple[str, ...]


# Each relation's markers, one tuple for both its wordings.
BIRTH = ("born", "birth")
DEATH = ("died", "death", "dead", "passed away", "burial", "buried")
CITIZENSHIP = ("citizen", "nationality", "national")
OCCUPATION = ("occupation", "profession", "job", "career", "works as", "work as")
LANGUAGE = ("language", "tongue", "speak", "spoke")
EMPLOYER = ("employer", "works for", "work for", "worked for", "employ")
EDUCATION = ("educat", "studied", "school", "university", "alma mater", "college")
SPOUSE = ("spouse", "married", "wife", "husband")
CHILD = ("child", "son", "daughter")
AWARD = ("award", "prize", "won", "honour", "honor")
TEAM = ("team", "club", "plays for", "played for", "league")
FOUNDER = ("found", "creat", "establish")
COUNTRY = ("country", "nation")
AUTHOR = ("author", "writer", "wrote", "written", "creat")
GENRE = ("genre", "style", "movement")
# "X follows" and "X is followed by" ask two relations (what came before X, what came after).
# "replaced by" names the successor, so "replaced" marks the predecessor only without it.
PREDECESSOR = ("follows", "preceded", "predecessor", "comes after", "came after", "replaced(?! by)")
SUCCESSOR = ("followed by", "succeeded by", "successor", "next", "replaced by")
FATHER = ("father", "parent", "son of", "daughter of")
MOTHER = ("mother", "parent", "son of", "daughter of")
SIBLING = ("sibling", "brother", "sister")
PARTY = ("party", "politic")
POSITION = ("position", "office", "title", "role")
FIELD = ("field", "discipline", "work in", "works in", "expert")
RELIGION = ("religion", "religious", "faith", "believ")
HEADQUARTERS = ("headquarter", "located", "location", "based in", "seat")
CAPITAL = ("capital",)
CONTINENT = ("continent",)
DIRECTOR = ("director", "directed")
BROADCASTER = ("network", "broadcast", "channel", "aired")

RELATIONS: tuple[Relation, ...] = (
    # People
    Relation("{subject} was born in the city of", BIRTH),
    Relation("The place where {subject} died is", DEATH),
    Relation("{subject} is a citizen of", CITIZENSHIP),
    Relation("By profession, {subject} is a", OCCUPATION),
    Relation("The gender of {subject} is", ("gender", "sex")),
    Relation("{subject} speaks the language", LANGUAGE),
    Relation("{subject} works for", EMPLOYER),
    Relation("{subject} was educated at", EDUCATION),
    Relation("{subject} is married to", SPOUSE),
    Relation("The father of {subject} is", FATHER),
    Relation("The mother of {subject} is", MOTHER),
    Relation("A child of {subject} is", CHILD),
    Relation("A sibling of {subject} is", SIBLING),
    Relation("{subject} received the award", AWARD),
    Relation("The political party of {subject} is", PARTY),
    Relation("The position held by {subject} is", POSITION),
    Relation("The field of work of {subject} is", FIELD),
    Relation("{subject} plays for the team", TEAM),
    Relation("The religion of {subject} is", RELIGION),
    # Organisations, places, works
    Relation("{subject} was founded by", FOUNDER),
    Relation("The headquarters of {subject} are in", HEADQUARTERS),
    Relation("{subject} is a part of", ("member", "part of", "belongs", "associated")),
    Relation("The capital city of {subject} is", CAPITAL),
    Relation("{subject} is in the country", COUNTRY),
    Relation("The continent of {subject} is", CONTINENT),
    Relation("{subject} was created by the author", AUTHOR),
    Relation("The director of {subject} is", DIRECTOR),
    Relation("{subject} is a work in the genre of", GENRE),
    Relation("The original broadcaster of {subject} is", BROADCASTER),
    Relation("{subject} is followed by", SUCCESSOR),
    # The same relations asked as "The <property> of {subject} is", the form questions built from
    # Wikidata's property labels take: at the layer the relation check reads, a prompt is nearer
    # a probe worded like it than one worded otherwise, and without these a question of that form
    # about another relation was nearer the edit's own prompt (when worded so) than any probe:
    # after "The name of the mother of S is", "The name of the father of S is" went through the
    # edit while "The father of S is" was a probe.
    Relation("The name of the country of citizenship of {subject} is", CITIZENSHIP),
    Relation("The occupation of {subject} is", OCCUPATION),
    Relation("The place of birth of {subject} is", BIRTH),
    Relation("The place of death of {subject} is", DEATH),
    Relation("The name of the employer of {subject} is", EMPLOYER),
    Relation("The name of the alma mater of {subject} is", EDUCATION),
    Relation("The name of the spouse of {subject} is", SPOUSE),
    Relation("The name of the child of {subject} is", CHILD),
    Relation("The name of the award {subject} won is", AWARD),
    Relation("The name of the founder of {subject} is", FOUNDER),
    Relation("The name of the country which {subject} is associated with is", COUNTRY),
    Relation("The official language of {subject} is", LANGUAGE),
    Relation("The name of the league which {subject} plays in is", TEAM),
    Relation("The genre of {subject} is", GENRE),
    Relation("The author of {subject} is", AUTHOR),
    Relation("{subject} follows", PREDECESSOR),
    Relation("The name of the father of {subject} is", FATHER),
    Relation("The name of the mother of {subject} is", MOTHER),
    Relation("The names of the siblings of {subject} are", SIBLING),
    Relation("The name of the political party of {subject} is", PARTY),
    Relation("The name of the position held by {subject} is", POSITION),
    Relation("The name of the field of work of {subject} is", FIELD),
    Relation("The name of the sports team which {subject} is a member of is", TEAM),
    Relation("The name of the religion which {subject} is associated with is", RELIGION),
    Relation("The name of the headquarters location of {subject} is", HEADQUARTERS),
    Relation("The name of the capital city of {subject} is", CAPITAL),
    Relation("The name of the continent which {subject} is part of is", CONTINENT),
    Relation("The name of the director of {subject} is", DIRECTOR),
    Relation("The name of the original broadcaster of {subject} is", BROADCASTER),
)


def _mentions(prompt: str, marker: str) -> bool:
    return re.search(r"\b" + marker, prompt) is not None


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
