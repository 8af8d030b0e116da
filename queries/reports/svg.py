"""Inline SVG charts for the HTML reports: histogram, signed bar chart, line chart, heatmap, layered node-link diagram.

Plain SVG elements styled by the page's stylesheet (classes `bar`, `axis`, `edge pos|neg`, ...), so a
chart needs no script and prints as it shows. Every mark carries a <title>, the browser's tooltip.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from circuit_catalog.queries.reports.html import Markup, join, tag


def _f(x: float) -> str:
    return f"{x:.1f}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (steps of 1, 2 or 5 times a power of ten) within [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(hi / step + 1e-9) + 1)]


def compact(n: float) -> str:
    """A count in at most four characters: 950, 12k, 3.5M."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.2g}{suffix}" if abs(n) < 10 * size else f"{n / size:.0f}{suffix}"
    return f"{n:g}"


def _svg(width: float, height: float, content: object, label: str) -> Markup:
    return tag("svg", content, cls="chart", width=_f(width), height=_f(height), viewBox=f"0 0 {_f(width)} {_f(height)}",
               role="img", aria_label=label, xmlns="http://www.w3.org/2000/svg")


def _text(x: float, y: float, text: object, anchor: str = "middle", cls: str | None = None, **attrs: object) -> Markup:
    return tag("text", text, x=_f(x), y=_f(y), text_anchor=anchor, cls=cls, **attrs)


def _line(x1: float, y1: float, x2: float, y2: float, cls: str) -> Markup:
    return Markup(f'<line x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}" class="{cls}"/>')


def histogram(edges: Sequence[float], counts: Sequence[int], *, width: float = 640, height: float = 220,
              x_label: str = "", y_label: str = "count", log_y: bool = False, x_tick: Callable[[float], str] = lambda v: f"{v:g}",
              bin_label: Callable[[float, float], str] | None = None, label: str = "histogram") -> Markup:
    """Bars over bins [edges[i], edges[i+1]) with counts[i]; `log_y` for counts spanning decades.
    `x_tick` formats axis values (e.g. 10**v for a log10 axis), `bin_label` a bar's tooltip range."""
    left, right, top, bottom = 58.0, 14.0, 10.0, 42.0
    pw, ph = width - left - right, height - top - bottom
    lo, hi = edges[0], edges[-1]
    peak = max(counts, default=0)

    def level(c: float) -> float:
        return (math.log10(c) + 1 if c > 0 else 0.0) if log_y else c

    top_level = max(level(peak), 1e-12)

    def sx(v: float) -> float:
        return left + (v - lo) / (hi - lo or 1) * pw

    def sy(c: float) -> float:
        return top + ph - level(c) / top_level * ph

    y_ticks = [10**k for k in range(int(math.log10(peak)) + 1)] if log_y and peak else [t for t in nice_ticks(0, peak, 4) if t == int(t)]
    parts = [_line(left, sy(t), left + pw, sy(t), "gridline") + _text(left - 6, sy(t) + 4, compact(t), "end") for t in y_ticks]
    describe = bin_label or (lambda a, b: f"{x_tick(a)} to {x_tick(b)}")
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        if c > 0:
            x0, x1 = sx(a), sx(b)
            parts.append(tag("rect", tag("title", f"{describe(a, b)}: {c:,}"), x=_f(x0 + 0.5), y=_f(sy(c)),
                             width=_f(max(x1 - x0 - 1, 0.8)), height=_f(top + ph - sy(c)), cls="bar"))
    for t in nice_ticks(lo, hi, 6):
        parts.append(_line(sx(t), top + ph, sx(t), top + ph + 4, "axis") + _text(sx(t), top + ph + 16, x_tick(t)))
    parts += [_line(left, top + ph, left + pw, top + ph, "axis"), _line(left, top, left, top + ph, "axis"),
              _text(left + pw / 2, height - 6, x_label, cls="label"),
              _text(14, top + ph / 2, f"{y_label} (log scale)" if log_y else y_label, cls="label", transform=f"rotate(-90 14 {_f(top + ph / 2)})")]
    return _svg(width, height, join(parts), label)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, width: float = 640, fmt: str = "{:+.3f}",
              hrefs: Sequence[str | None] | None = None, label: str = "bar chart") -> Markup:
    """Horizontal bars, one row per label; negative values extend left of zero in the negative colour."""
    row, left, right = 20.0, 120.0, 70.0
    height = row * len(labels) + 8
    lo, hi = min(0.0, *values) if values else 0.0, max(0.0, *values) if values else 1.0
    span = (hi - lo) or 1.0
    pw = width - left - right

    def sx(v: float) -> float:
        return left + (v - lo) / span * pw

    parts = [_line(sx(0), 2, sx(0), height - 4, "axis")]
    for i, (name, v) in enumerate(zip(labels, values)):
        y = 4 + i * row
        text = _text(left - 8, y + 13, name, "end", cls="label")
        href = hrefs[i] if hrefs else None
        parts.append(tag("a", text, href=href) if href else text)
        x0, x1 = sorted((sx(0), sx(v)))
        parts.append(tag("rect", tag("title", f"{name}: {fmt.format(v)}"), x=_f(x0), y=_f(y + 2), width=_f(max(x1 - x0, 0.8)),
                         height=_f(row - 6), cls="barpos" if v >= 0 else "barneg"))
        parts.append(_text(max(x1, sx(0)) + 6, y + 13, fmt.format(v), "start"))
    return _svg(width, height, join(parts), label)


def line_chart(xs: Sequence[float], ys: Sequence[float | None], *, width: float = 320, height: float = 180, x_label: str = "",
               y_label: str = "", fmt: str = "{:.3g}", label: str = "line chart") -> Markup:
    """One series against x (points with no y value are skipped); every point carries its value as a tooltip."""
    left, right, top, bottom = 50.0, 12.0, 10.0, 40.0
    pw, ph = width - left - right, height - top - bottom
    points = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if not points:
        return _svg(width, height, _text(width / 2, height / 2, "no values"), label)
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    y_lo, y_hi = min(0.0, *(y for _, y in points)), max(y for _, y in points)

    def sx(v: float) -> float:
        return left + (v - x_lo) / ((x_hi - x_lo) or 1) * pw

    def sy(v: float) -> float:
        return top + ph - (v - y_lo) / ((y_hi - y_lo) or 1) * ph

    parts = [_line(left, sy(t), left + pw, sy(t), "gridline") + _text(left - 6, sy(t) + 4, f"{t:g}", "end") for t in nice_ticks(y_lo, y_hi, 4)]
    parts += [_line(sx(t), top + ph, sx(t), top + ph + 4, "axis") + _text(sx(t), top + ph + 16, compact(t)) for t in nice_ticks(x_lo, x_hi, 4)]
    parts.append(Markup(f'<polyline class="series" points="{" ".join(f"{_f(sx(x))},{_f(sy(y))}" for x, y in points)}"/>'))
    parts += [tag("circle", tag("title", f"{x_label} {x:g}: {fmt.format(y)}"), cx=_f(sx(x)), cy=_f(sy(y)), r="2.5", cls="point")
              for x, y in points]
    parts += [_line(left, top + ph, left + pw, top + ph, "axis"), _line(left, top, left, top + ph, "axis"),
              _text(left + pw / 2, height - 6, x_label, cls="label"),
              _text(12, top + ph / 2, y_label, cls="label", transform=f"rotate(-90 12 {_f(top + ph / 2)})")]
    return _svg(width, height, join(parts), label)


def heatmap(row_labels: Sequence[str], col_labels: Sequence[str], values: Sequence[Sequence[float | None]], *,
            fmt: str = "{:.3g}", x_label: str = "", y_label: str = "", label: str = "heatmap") -> Markup:
    """A grid of cells shaded by value (darker = larger, blank where None), rows `y_label`, columns
    `x_label`; cells are sized to make the grid about 400 px wide, labels thinned where they would crowd."""
    cell = min(40.0, max(10.0, 400 / max(len(col_labels), len(row_labels), 1)))
    left, top, bottom = 46.0, 10.0, 40.0
    width, height = max(left + cell * len(col_labels) + 90, 340), top + cell * len(row_labels) + bottom
    known = [v for r in values for v in r if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    every = max(1, math.ceil(14 / cell))

    def fill(shade: float) -> str:
        return f"hsl(174, 60%, {90 - 64 * shade:.0f}%)"

    parts = []
    for i, (name, r) in enumerate(zip(row_labels, values)):
        y = top + i * cell
        if i % every == 0:
            parts.append(_text(left - 4, y + cell / 2 + 4, name, "end"))
        for j, v in enumerate(r):
            if v is not None:
                parts.append(tag("rect", tag("title", f"{y_label} {name}, {x_label} {col_labels[j]}: {fmt.format(v)}"), x=_f(left + j * cell),
                                 y=_f(y), width=_f(cell - 1), height=_f(cell - 1), fill=fill((v - lo) / ((hi - lo) or 1))))
    for j, name in enumerate(col_labels):
        if j % every == 0:
            parts.append(_text(left + (j + 0.5) * cell, top + cell * len(row_labels) + 14, name))
    gx = left + cell * len(col_labels) + 14
    for k, (text, shade) in enumerate(((fmt.format(hi), 1.0), (fmt.format(lo), 0.0))):
        parts.append(tag("rect", x=_f(gx), y=_f(top + k * 22), width="14", height="14", fill=fill(shade), stroke="#d8dee4")
                     + _text(gx + 20, top + k * 22 + 11, text, "start"))
    parts.append(_text(4, height - 8, f"rows: {y_label} · columns: {x_label}", "start", cls="label"))
    return _svg(width, height, join(parts), label)


@dataclass
class Node:
    id: str
    label: str
    column: Hashable  # e.g. the layer; columns are drawn in sorted order, left to right
    order: float = 0.0  # position within the column, top to bottom
    href: str | None = None
    title: str | None = None
    focus: bool = False


@dataclass
class Link:
    src: str
    dst: str
    weight: float


def layered_graph(nodes: Sequence[Node], links: Sequence[Link], *, column_label: Callable[[Hashable], str] = str,
                  column_width: float = 150, row_height: float = 30, node_width: float = 92, label: str = "graph") -> Markup:
    """Nodes in columns (e.g. layers), links as curves whose width follows |weight| and colour its sign."""
    columns: dict[Hashable, list[Node]] = defaultdict(list)
    for n in nodes:
        columns[n.column].append(n)
    keys = sorted(columns)
    top, node_h = 30.0, row_height - 8
    tallest = max((len(c) for c in columns.values()), default=1)
    width, height = column_width * len(keys) + 16, top + row_height * tallest + 8
    where: dict[str, tuple[float, float]] = {}
    for ci, key in enumerate(keys):
        group = sorted(columns[key], key=lambda n: n.order)
        offset = (tallest - len(group)) * row_height / 2
        for ri, n in enumerate(group):
            where[n.id] = (8 + ci * column_width + (column_width - node_width) / 2, top + offset + ri * row_height)
    strongest = max((abs(k.weight) for k in links), default=1.0) or 1.0
    parts = [_text(8 + (ci + 0.5) * column_width, 16, column_label(key), cls="label") for ci, key in enumerate(keys)]
    for k in sorted(links, key=lambda k: abs(k.weight)):
        if k.src not in where or k.dst not in where:
            continue
        (x1, y1), (x2, y2) = where[k.src], where[k.dst]
        if x1 > x2:
            (x1, y1), (x2, y2) = (x2, y2), (x1, y1)
        x1, y1, y2 = x1 + node_width, y1 + node_h / 2, y2 + node_h / 2  # right edge of the left node to left edge of the right one
        mid = (x1 + x2) / 2
        path = f"M{_f(x1)},{_f(y1)} C{_f(mid)},{_f(y1)} {_f(mid)},{_f(y2)} {_f(x2)},{_f(y2)}"
        parts.append(tag("path", tag("title", f"{k.src} → {k.dst}: {k.weight:+.4g}"), d=path, fill="none",
                         cls=f"edge {'pos' if k.weight >= 0 else 'neg'}", stroke_width=_f(1 + 5 * abs(k.weight) / strongest),
                         stroke_opacity="0.65"))
    for n in nodes:
        x, y = where[n.id]
        box = (tag("title", n.title or n.label) + tag("rect", x=_f(x), y=_f(y), width=_f(node_width), height=_f(node_h), rx="4")
               + _text(x + node_width / 2, y + node_h / 2 + 4, n.label))
        body = tag("a", box, href=n.href) if n.href else box
        parts.append(tag("g", body, cls="node focus" if n.focus else "node"))
    return _svg(width, height, join(parts), label)



@dataclass
class GridNode:
    id: str
    label: str  # short text drawn in the node
    x: int  # column (e.g. token position)
    y: int  # row from the bottom (e.g. layer; embeddings lowest, logits highest)
    kind: str = "feature"  # css class: feature | error | token | logit
    href: str | None = None
    title: str | None = None


@dataclass
class GridGroup:
    """Nodes that belong together (a supernode's members), outlined in one colour and named in the legend."""

    label: str
    members: Sequence[str]  # node ids; those not drawn are skipped


# outline colours, apart from the node kinds' fills and the edges' blue and red
GROUP_COLOURS = ("#9333ea", "#db2777", "#0d9488", "#ca8a04", "#4f46e5", "#65a30d", "#0891b2", "#b45309")


def grid_graph(nodes: Sequence[GridNode], links: Sequence[Link], *, x_labels: Sequence[str], y_label: Callable[[int], str] = str,
               column_width: float = 96, row_height: float = 26, label: str = "graph", groups: Sequence[GridGroup] = ()) -> Markup:
    """Nodes on a grid (columns x rows, row 0 at the bottom), several per cell side by side; links as
    straight lines whose width follows |weight| and colour its sign, the strongest drawn on top; each of `groups`
    (at most len(GROUP_COLOURS)) as an outline of its colour around each member, named in a legend below."""
    if len(groups) > len(GROUP_COLOURS):
        raise ValueError(f"{len(groups)} groups: at most {len(GROUP_COLOURS)} colours")
    rows = sorted({n.y for n in nodes})
    row_of = {y: i for i, y in enumerate(reversed(rows))}  # top to bottom on screen
    left, top = 64.0, 26.0
    width, height = left + column_width * len(x_labels) + 8, top + row_height * len(rows) + 8
    legend = _legend(groups, left, height, width - left) if groups else []
    height += 20 * len(legend)
    cells: dict[tuple[int, int], list[GridNode]] = defaultdict(list)
    for n in nodes:
        cells[(n.x, n.y)].append(n)
    where: dict[str, tuple[float, float]] = {}
    box_h = row_height - 8
    for (x, y), group in cells.items():
        box_w = min(40.0, (column_width - 8) / len(group) - 2)
        start = left + x * column_width + (column_width - len(group) * (box_w + 2)) / 2
        for i, n in enumerate(group):
            where[n.id] = (start + i * (box_w + 2), top + row_of[y] * row_height + 4, box_w)
    parts = [_text(left + (i + 0.5) * column_width, 16, text, cls="label") for i, text in enumerate(x_labels)]
    parts += [_text(left - 6, top + row_of[y] * row_height + row_height / 2 + 4, y_label(y), "end") for y in rows]
    strongest = max((abs(k.weight) for k in links), default=1.0) or 1.0
    for k in sorted(links, key=lambda k: abs(k.weight)):
        if k.src not in where or k.dst not in where:
            continue
        (x1, y1, w1), (x2, y2, w2) = where[k.src], where[k.dst]
        parts.append(tag("line", tag("title", f"{k.src} → {k.dst}: {k.weight:+.4g}"), x1=_f(x1 + w1 / 2), y1=_f(y1),
                         x2=_f(x2 + w2 / 2), y2=_f(y2 + box_h), cls=f"edge {'pos' if k.weight >= 0 else 'neg'}",
                         stroke_width=_f(0.5 + 4 * abs(k.weight) / strongest), stroke_opacity="0.55"))
    for n in nodes:
        x, y, w = where[n.id]
        box = (tag("title", n.title or n.label) + tag("rect", x=_f(x), y=_f(y), width=_f(w), height=_f(box_h), rx="3")
               + _text(x + w / 2, y + box_h / 2 + 4, n.label if w >= 26 else ""))
        parts.append(tag("g", tag("a", box, href=n.href) if n.href else box, cls=f"node {n.kind}"))
    rings: dict[str, int] = defaultdict(int)  # outlines already around a node: a second one goes outside the first
    for colour, g in zip(GROUP_COLOURS, groups):
        outlines = []
        for nid in (m for m in g.members if m in where):
            x, y, w = where[nid]
            pad = 2.5 + 3 * rings[nid]
            rings[nid] += 1
            outlines.append(tag("rect", x=_f(x - pad), y=_f(y - pad), width=_f(w + 2 * pad), height=_f(box_h + 2 * pad), rx="4",
                                fill="none", stroke=colour, stroke_width="2"))
        parts.append(tag("g", tag("title", g.label) + join(outlines), cls="group"))
    parts += [item for line in legend for item in line]
    return _svg(width, height, join(parts), label)


def _legend(groups: Sequence[GridGroup], left: float, top: float, width: float) -> list[list[Markup]]:
    """Lines of legend entries (a swatch of the group's colour, its label) filling `width`, the first at `top`."""
    lines: list[list[Markup]] = [[]]
    x = left
    for colour, g in zip(GROUP_COLOURS, groups):
        entry_w = 22 + 6.2 * len(g.label)  # the swatch, and the label at about 6.2 px a character
        if lines[-1] and x + entry_w > left + width:
            lines.append([])
            x = left
        y = top + 20 * (len(lines) - 1) + 4
        lines[-1].append(tag("g", tag("rect", x=_f(x), y=_f(y), width="12", height="12", rx="3", fill="none", stroke=colour,
                                      stroke_width="2") + _text(x + 17, y + 10, g.label, "start", cls="label"), cls="legend"))
        x += entry_w + 14
    return lines
