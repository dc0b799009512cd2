"""``report.html``: one self-contained file, readable offline. Inline CSS, inline SVG
charts, no script, and a Content-Security-Policy that forbids loading anything at all, so
opening it contacts nothing and a browser shows exactly what was signed."""

from __future__ import annotations

from html import escape

from authz.evidence.report import (
    Banner,
    Chart,
    Figures,
    Heading,
    PageBreak,
    Para,
    Report,
    Table,
)

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 Helvetica, Arial, sans-serif; color: #1f2933; margin: 2rem auto;
       max-width: 60rem; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin: 0 0 1rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 .6rem; border-bottom: 2px solid #d9e2ec;
     padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
.banner { padding: .8rem 1rem; border-radius: 4px; margin: 0 0 1rem; font-weight: bold; }
.banner.ok { background: #e3f9e5; border: 1px solid #57ae5b; }
.banner.bad { background: #ffe3e3; border: 2px solid #c53030; color: #8a1c1c; }
.muted { color: #616e7c; }
table { border-collapse: collapse; width: 100%; margin: .3rem 0 .8rem; font-size: 12.5px; }
th, td { border: 1px solid #d9e2ec; padding: .25rem .45rem; text-align: left;
         vertical-align: top; word-break: break-word; }
th { background: #f0f4f8; }
dl.figures { display: grid; grid-template-columns: 16rem 1fr; gap: .15rem 1rem; margin: 0 0 1rem; }
dl.figures dt { color: #616e7c; }
dl.figures dd { margin: 0; font-weight: bold; word-break: break-all; }
figure { margin: .8rem 0; }
svg.chart { max-width: 100%; height: auto; }
@media print { body { margin: 0; max-width: none; } h2 { break-after: avoid; }
               figure, table { break-inside: avoid; } }
"""


def render_html(report: Report) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(report.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{escape(report.title)}</h1>",
    ]
    for block in report.blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            cls = ' class="muted"' if block.muted else ""
            out.append(f"<p{cls}>{escape(block.text)}</p>")
        elif isinstance(block, Banner):
            cls = "ok" if block.ok else "bad"
            out.append(f'<div class="banner {cls}" role="status">{escape(block.text)}</div>')
        elif isinstance(block, Figures):
            out.append('<dl class="figures">')
            out.extend(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in block.pairs)
            out.append("</dl>")
        elif isinstance(block, Table):
            if not block.rows:
                out.append(f'<p class="muted">{escape(block.empty)}</p>')
                continue
            out.append("<table><thead><tr>")
            out.extend(f"<th>{escape(c)}</th>" for c in block.columns)
            out.append("</tr></thead><tbody>")
            for row in block.rows:
                out.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>")
            out.append("</tbody></table>")
        elif isinstance(block, Chart):
            out.append(f"<figure>{block.svg}</figure>")  # built by charts.py, text escaped
        elif isinstance(block, PageBreak):
            continue
    out.append("</body></html>")
    return "\n".join(out) + "\n"
