"""Is a user's Cypher statement a plain read? An allow-list of read clauses, checked on tokens.

A deny-list of write clauses missed `LOAD FROM` (reads any file), `COPY ... TO` (writes one) and
`CHECKPOINT`; engines keep adding clauses, so the check names what may run instead. Cypher puts a
clause keyword only where a term has just ended (`... RETURN`, `(n) SET`, `1 AS x LOAD`), or at the
start of a statement or subquery. The check walks the tokens, tracks whether a term has just ended,
and there allows only the words of a read query; elsewhere a word is a name or an operand. String
literals, quoted names and comments are skipped with the engines' own rules (backslash escapes).

The statement's size is bounded first: LadybugDB's parser recurses per nesting level and per
operator of a chain, and crashes the process (SIGSEGV) on `RETURN 1+1+...` of 10,000 terms or on
deep brackets (a chain of 4,000 already takes seconds); the project's own queries use under 300 tokens.
"""

from __future__ import annotations

import re

MAX_QUERY_CHARS = 20_000
MAX_TOKENS = 2_000
MAX_NESTING = 64

STARTS = {"MATCH", "OPTIONAL", "UNWIND", "WITH", "RETURN"}
# words that may follow a complete term in a read query
AFTER_TERM = STARTS | {
    "WHERE", "ORDER", "BY", "SKIP", "LIMIT", "UNION", "ALL", "AS", "AND", "OR", "XOR", "NOT", "IN", "IS",
    "STARTS", "ENDS", "CONTAINS", "WHEN", "THEN", "ELSE", "END", "ASC", "DESC", "ASCENDING", "DESCENDING",
}
TERM_WORDS = {"NULL", "TRUE", "FALSE", "END", "ASC", "DESC", "ASCENDING", "DESCENDING"}  # keywords that end a term
KEYWORDS = AFTER_TERM | TERM_WORDS | {"DISTINCT", "CASE"}

_TOKEN = re.compile(
    r"""(?P<skip>\s+|//[^\n]*|/\*.*?\*/)
      | (?P<term>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|`[^`]*`|\$\w+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)
      | (?P<word>[A-Za-z_]\w*)
      | (?P<punct>.)""",
    re.S | re.X,
)


class NotReadOnly(ValueError):
    """The reason a statement is refused, as one line."""


def tokens(query: str) -> list[tuple[str, str]]:
    """(kind, text) pairs: kind is term, word or punct; whitespace and comments dropped."""
    return [(m.lastgroup, m.group()) for m in _TOKEN.finditer(query) if m.lastgroup != "skip"]


def check_size(query: str) -> None:
    """Refuse statements too long or too deeply nested to hand to a parser that recurses."""
    if len(query) > MAX_QUERY_CHARS:
        raise NotReadOnly(f"query of {len(query):,} characters; at most {MAX_QUERY_CHARS:,}")
    toks = tokens(query)
    if len(toks) > MAX_TOKENS:
        raise NotReadOnly(f"query of {len(toks):,} tokens; at most {MAX_TOKENS:,}")
    depth = deepest = 0
    for kind, text in toks:
        if kind == "punct" and text in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif kind == "punct" and text in ")]}":
            depth -= 1
    if deepest > MAX_NESTING:
        raise NotReadOnly(f"query nested {deepest} levels deep; at most {MAX_NESTING}")


def check_read_only(query: str) -> None:
    """Raise `NotReadOnly` unless `query` is one statement built only of read clauses."""
    toks = tokens(query)
    while toks and toks[-1] == ("punct", ";"):
        toks.pop()
    if not toks:
        raise NotReadOnly("empty query")
    clause_position = True  # the statement's start: a clause keyword must come next
    previous = ""
    for i, (kind, text) in enumerate(toks):
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "word":
            word = text.upper()
            if clause_position and following != ":" and previous != ".":  # `{id: ...}` keys and `n.prop` are names
                allowed = STARTS if i == 0 or previous == "{" else AFTER_TERM
                if word not in allowed:
                    raise NotReadOnly(f"{word} is not a read clause; queries are read-only unless --write is given "
                                      f"(read clauses: {', '.join(sorted(STARTS | {'WHERE', 'ORDER BY', 'SKIP', 'LIMIT', 'UNION'}))})")
            if word == "UNION" or (word == "ALL" and previous.upper() == "UNION"):
                clause_position = True  # a whole query follows
            elif word in TERM_WORDS or word not in KEYWORDS or previous == ".":
                clause_position = True  # a name, a property or a literal keyword ended a term
            else:
                clause_position = False  # a keyword: an operand follows
        elif kind == "term":
            clause_position = True
        elif text == ";":
            raise NotReadOnly("one statement at a time")
        elif text in ")]}":
            clause_position = True
        elif text == "{":
            clause_position = True  # a subquery's clause or a map's key (checked above by the ':')
        elif text == "*":
            clause_position = previous.upper() in {"RETURN", "WITH", "DISTINCT", "(", ","}  # `RETURN *`, `count(*)`
        else:
            clause_position = False
        previous = text
