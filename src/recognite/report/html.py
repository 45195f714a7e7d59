"""One self-contained HTML page for a report: inline CSS and JS, figures by relative file name."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1150px; padding: 0 18px 40px; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f4f6; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #aaa; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; max-width: 900px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 0.8em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 6px 14px; min-width: 92px; }
.card .v { font-size: 1.45em; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .k { color: #555; font-size: 0.85em; }
details { margin: 0.6em 0; } summary { cursor: pointer; color: #1f3b73; }
.scroll { max-height: 460px; overflow-y: auto; display: inline-block; }
.note { color: #555; font-size: 0.9em; }
"""

# Click a header to sort by that column (numbers by their data-value), click again to reverse.
_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var asc = th.dataset.order !== 'asc'; th.dataset.order = asc ? 'asc' : 'desc';
      var key = function (row) { var c = row.cells[col], v = c.dataset.value;
        return v !== undefined ? parseFloat(v) : c.textContent.toLowerCase(); };
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        if (typeof x === 'number' && isNaN(x)) return 1; if (typeof y === 'number' && isNaN(y)) return -1;
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


@dataclass
class Figure:
    """A figure of the page: a PNG file name relative to the page, a title and a caption."""

    file_name: str
    title: str
    caption: str
    anchor: str = ""


@dataclass
class Table:
    """A table: ``columns`` names, ``rows`` of cell values (numbers are right-aligned and sortable)."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    sortable: bool = False
    scroll: bool = False
    anchor: str = ""


@dataclass
class Page:
    """Everything on the page, in order: title, summary cards and table, config, figures, tables."""

    title: str
    subtitle: str
    cards: Sequence[tuple[str, str, str]]  # (metric key, label, formatted value)
    summary_rows: Sequence[tuple[str, Any, str]]  # (name, value, explanation)
    config: dict[str, Any]
    key_settings: Sequence[str]
    sections: Sequence[Figure | Table] = field(default_factory=list)
    footer: str = ""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_number(value: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` decimals (ints as they are), ``n/a`` for ``None`` / nan."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        data_value = repr(number) if math.isfinite(number) else "NaN"
        return f'<td class="num" data-value="{data_value}">{_esc(format_number(value))}</td>'
    return f"<td>{_esc(value)}</td>"


def _table(table: Table) -> str:
    anchor = f' id="{_esc(table.anchor)}"' if table.anchor else ""
    parts = [f"<h2{anchor}>{_esc(table.title)}</h2>"]
    if table.caption:
        parts.append(f'<p class="note">{_esc(table.caption)}</p>')
    if not table.rows:
        parts.append("<p><em>Nothing to show.</em></p>")
        return "\n".join(parts)
    cls = ' class="sortable"' if table.sortable else ""
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
    body = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in table.rows)
    markup = f"<table{cls}><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
    parts.append(f'<div class="scroll">{markup}</div>' if table.scroll else markup)
    return "\n".join(parts)


def _figure(figure: Figure) -> str:
    anchor = f' id="{_esc(figure.anchor)}"' if figure.anchor else ""
    return (
        f"<h2{anchor}>{_esc(figure.title)}</h2>\n<figure><img src=\"{_esc(figure.file_name)}\" "
        f"alt=\"{_esc(figure.title)}\"><figcaption>{_esc(figure.caption)}</figcaption></figure>"
    )


def render_page(page: Page) -> str:
    """The page as one HTML string (UTF-8, no external resources besides the figure files)."""
    cards = "".join(
        f'<div class="card"><div class="v" data-metric="{_esc(key)}">{_esc(value)}</div>'
        f'<div class="k">{_esc(label)}</div></div>'
        for key, label, value in page.cards
    )
    summary = "\n".join(
        f'<tr><th>{_esc(name)}</th><td class="num" data-metric="{_esc(name)}">{_esc(format_number(value))}</td>'
        f"<td>{_esc(explanation)}</td></tr>"
        for name, value, explanation in page.summary_rows
    )
    config_rows = "\n".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in page.config.items()
    )
    toc = " · ".join(
        f'<a href="#{_esc(s.anchor)}">{_esc(s.title)}</a>' for s in page.sections if s.anchor
    )
    sections = "\n".join(_figure(s) if isinstance(s, Figure) else _table(s) for s in page.sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(page.title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_esc(page.title)}</h1>
<p class="sub">{_esc(page.subtitle)}</p>
<div class="cards">{cards}</div>
<p class="note">Settings: {_esc(" · ".join(page.key_settings))}</p>
<details><summary>Full run configuration (config of the checkpoint)</summary>
<table>{config_rows}</table></details>
<details open><summary>Summary metrics, recomputed from the checkpoint</summary>
<table><thead><tr><th>metric</th><th>value</th><th>meaning</th></tr></thead><tbody>
{summary}
</tbody></table></details>
<p>{toc}</p>
{sections}
<p class="note">{_esc(page.footer)}</p>
<script>{_JS}</script>
</body>
</html>
"""
