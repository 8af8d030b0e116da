"""HTML reports over a catalog: feature cards, prompt graphs and the catalog overview (one self-contained page each).

`html` (page shell, escaping, tables) and `svg` (charts, layered node-link diagrams) are shared by
every report; each report module gathers its data through the query API and renders with them.
"""
