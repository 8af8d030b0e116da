"""Self-contained HTML pages: one shell with an inline stylesheet, escaping, tables, token rendering.

Every report builds its body from these pieces, so all pages look alike and no report escapes text
its own way. Text is escaped unless it is `Markup` (already-built HTML). No JavaScript, no external
CSS or fonts: a page opens from disk, offline, and renders the same everywhere.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path

from circuit_catalog.catalog.parquet_io import write_text_atomic


class Markup(str):
    """HTML that is already safe to insert as is; `+` escapes plain text on the other side."""

    def __add__(self, other: object) -> Markup:
        return Markup(str.__add__(self, esc(other)))

    def __radd__(self, other: object) -> Markup:
        return Markup(str.__add__(esc(other), self))


def esc(value: object) -> Markup:
    """`value` as HTML text (Markup passes through unchanged)."""
    return value if isinstance(value, Markup) else Markup(html.escape(str(value), quote=True))


def join(parts: Iterable[object], sep: str = "") -> Markup:
    return Markup(sep.join(esc(p) for p in parts))


def tag(name: str, content: object = "", **attrs: object) -> Markup:
    """<name attrs>content</name>; attribute names use `cls` for class and underscores for dashes."""
    rendered = "".join(
        f' {("class" if k == "cls" else k.replace("_", "-"))}="{esc(v)}"' for k, v in attrs.items() if v is not None
    )
    return Markup(f"<{name}{rendered}>{esc(content)}</{name}>")


def signed(value: float, fmt: str = "{:+.3f}") -> Markup:
    """A weight coloured by its sign (blue positive, red negative)."""
    return tag("span", fmt.format(value), cls="pos" if value > 0 else "neg" if value < 0 else "zero")


def token(text: str) -> Markup:
    """One token's text, with its spaces kept and line breaks shown as symbols."""
    return tag("span", text.replace("\n", "↵").replace("\t", "⇥") or "∅", cls="tok")


def token_window(tokens: Sequence[str], firing: int, activation: float | None = None) -> Markup:
    """A context window with the firing token highlighted (its activation in the tooltip)."""
    title = None if activation is None else f"activation {activation:.3f}"
    return tag("span", join(
        tag("mark", token(t), title=title) if i == firing else token(t) for i, t in enumerate(tokens)
    ), cls="window")


def table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Iterable[int] = (), cls: str | None = None,
          empty: str = "none") -> Markup:
    """A table; columns whose index is in `numeric` are right-aligned with tabular figures."""
    right = set(numeric)
    head = join(tag("th", h, cls="num" if i in right else None) for i, h in enumerate(header))
    body = [tag("tr", join(tag("td", c, cls="num" if i in right else None) for i, c in enumerate(row))) for row in rows]
    if not body:
        body = [tag("tr", tag("td", empty, colspan=len(header), cls="empty"))]
    return tag("table", tag("thead", tag("tr", head)) + tag("tbody", join(body)), cls=cls)


def figures(pairs: Iterable[tuple[str, object]]) -> Markup:
    """Headline figures as label/value tiles."""
    return tag("dl", join(tag("div", tag("dt", k) + tag("dd", v)) for k, v in pairs), cls="figures")


def section(title: str, *parts: object, note: str | None = None, id: str | None = None) -> Markup:
    intro = tag("p", note, cls="note") if note else Markup("")
    return tag("section", tag("h2", title) + intro + join(parts), id=id)


def link(href: str | None, text: object, missing: str = "no page written for this") -> Markup:
    """A relative link, or (href None) the text marked as unlinked, so no link is ever dead."""
    return tag("a", text, href=href) if href else tag("span", text, cls="unlinked", title=missing)


def banner(text: object, kind: str = "info") -> Markup:
    return tag("div", text, cls=f"banner {kind}")


def page(title: str, body: object, subtitle: object = "", nav: Sequence[tuple[str, str]] = (),
         meta: dict[str, str] | None = None) -> str:
    """A complete HTML document: head with the inline stylesheet, a header, the body."""
    metas = join(Markup(f'<meta name="{esc(k)}" content="{esc(v)}">') for k, v in (meta or {}).items())
    links = tag("nav", join((tag("a", text, href=href) for href, text in nav), " · ")) if nav else Markup("")
    header = tag("header", links + tag("h1", title) + (tag("p", subtitle, cls="subtitle") if subtitle else Markup("")))
    head = tag("head", Markup('<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
                              '<link rel="icon" href="data:,">') + metas + tag("title", title) + tag("style", Markup(STYLE)))
    document = tag("html", head + tag("body", header + tag("main", body) + tag("footer", "circuit-catalog")), lang="en")
    return f"<!DOCTYPE html>\n{document}\n"


def write_page(path: Path, document: str) -> Path:
    """Write a page atomically (a reader never sees half a file)."""
    write_text_atomic(document, path)
    return path


STYLE = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d8dee4; --bg: #ffffff; --panel: #f6f8fa;
        --pos: #1d4ed8; --neg: #b91c1c; --accent: #0f766e; --mark: #fcd34d; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: var(--fg); background: var(--bg); }
header { padding: 20px 32px 12px; border-bottom: 1px solid var(--line); background: var(--panel); }
header h1 { margin: 4px 0; font-size: 24px; }
header nav { font-size: 13px; }
.subtitle { margin: 0; color: var(--muted); }
main { max-width: 1180px; padding: 8px 32px 32px; }
footer { padding: 12px 32px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); }
section { margin-top: 28px; }
h2 { font-size: 18px; margin: 0 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 16px 0 6px; }
.note { color: var(--muted); margin: 4px 0 10px; font-size: 13px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.unlinked { border-bottom: 1px dashed var(--muted); cursor: help; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--panel); font-weight: 600; font-size: 13px; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.empty { color: var(--muted); font-style: italic; }
.pos { color: var(--pos); } .neg { color: var(--neg); } .zero { color: var(--muted); }
.tok { white-space: pre; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px;
       background: #eef1f4; border-radius: 3px; padding: 0 2px; margin: 0 1px; }
.window .tok { background: none; margin: 0; padding: 0; border-radius: 0; }
.window .tok + .tok, .window mark + .tok, .window .tok + mark { box-shadow: inset 1px 0 0 #e1e5ea; }  /* token boundaries */
.window mark { background: var(--mark); border-radius: 3px; padding: 1px 0; font-weight: 600; }
.window mark .tok { font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 8px 24px; }
.figures { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0 0; }
.figures div { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.figures dt { font-size: 12px; color: var(--muted); }
.figures dd { margin: 0; font-size: 17px; font-weight: 600; font-variant-numeric: tabular-nums; }
.banner { padding: 10px 14px; border-radius: 6px; margin: 16px 0 0; }
.banner.info { background: #ecfdf5; border: 1px solid #a7f3d0; }
.banner.blind { background: #fef3c7; border: 1px solid #fcd34d; }
.banner.warn { background: #fff7ed; border: 1px solid #fdba74; }
.chart { display: block; max-width: 100%; height: auto; margin: 6px 0 12px; }
.chart text { font: 11px system-ui, "DejaVu Sans", sans-serif; fill: var(--muted); }
.chart .label { fill: var(--fg); }
.chart .bar { fill: #5b8db8; } .chart .bar:hover { fill: #2f6690; }
.chart .axis { stroke: #8c959f; stroke-width: 1; }
.chart .gridline { stroke: #eaeef2; stroke-width: 1; }
.chart .series { fill: none; stroke: #5b8db8; stroke-width: 1.5; } .chart .point { fill: #2f6690; }
.chart .edge.pos { stroke: var(--pos); } .chart .edge.neg { stroke: var(--neg); }
.chart .node rect { fill: #ffffff; stroke: #8c959f; }
.chart .node.focus rect { fill: #fef3c7; stroke: #d97706; }
.chart .node text { fill: var(--fg); }
.chart a:hover rect { stroke: var(--accent); stroke-width: 2; }
.chart .barpos { fill: var(--pos); } .chart .barneg { fill: var(--neg); }
.chart .node.feature rect { fill: #dbeafe; stroke: #3b82f6; } .chart .node.error rect { fill: #e5e7eb; stroke: #6b7280; }
.chart .node.token rect { fill: #dcfce7; stroke: #16a34a; } .chart .node.logit rect { fill: #ffedd5; stroke: #ea580c; }
.chart .node text { font-size: 10px; }
"""
