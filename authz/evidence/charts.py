"""SVG charts, drawn from figures alone: no script, no external font or stylesheet, so the
same markup shows in a browser offline and is drawn by the PDF writer (fpdf2's SVG support).

Every chart is an ``<svg class="chart" data-chart=ID data-points=N>`` whose data points are
``class="bar"`` shapes, one each, so a test (or a reader) can tell a chart that rendered its
data from an empty box. Text is printable ASCII: anything else appears as ``\\uXXXX``, as in
the archive itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from xml.sax.saxutils import escape as _xml_escape
from xml.sax.saxutils import quoteattr

FONT = "Helvetica"
INK = "#1f2933"
MUTED = "#616e7c"
GRID = "#d9e2ec"
PALETTE = ("#2f6fbe", "#c2410c", "#2f855a", "#7b5ea7", "#b7791f", "#4a5568", "#c53030")
WIDTH = 680


def ascii_text(text: str) -> str:
    return "".join(c if 0x20 <= ord(c) < 0x7F else f"\\u{ord(c):04x}" for c in text)


def _t(text: str) -> str:
    return _xml_escape(ascii_text(text))


def _open(chart_id: str, title: str, height: int, points: int) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart={quoteattr(chart_id)}'
        f' data-points="{points}" width="{WIDTH}" height="{height}"'
        f' viewBox="0 0 {WIDTH} {height}" role="img">',
        f"<title>{_t(title)}</title>",
        f'<text x="0" y="14" font-family="{FONT}" font-size="13" font-weight="bold"'
        f' fill="{INK}">{_t(title)}</text>',
    ]


def _empty(parts: list[str], height: int) -> str:
    parts.append(
        f'<text x="0" y="{height // 2 + 10}" font-family="{FONT}" font-size="12"'
        f' fill="{MUTED}">no records in the period</text></svg>'
    )
    return "".join(parts)


def bar_chart(chart_id: str, title: str, items: Sequence[tuple[str, int]]) -> str:
    """Horizontal bars, one per (label, value), largest first as given."""
    row = 20
    height = 30 + max(len(items), 1) * row + 6
    parts = _open(chart_id, title, height, len(items))
    if not items:
        return _empty(parts, 40)
    label_w, value_w = 250, 60
    span = WIDTH - label_w - value_w
    top = max(v for _, v in items) or 1
    for i, (label, value) in enumerate(items):
        y = 28 + i * row
        w = max(1, round(span * value / top)) if value else 1
        shown = label if len(label) <= 38 else label[:35] + "..."
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 13}" font-family="{FONT}" font-size="11"'
            f' fill="{INK}" text-anchor="end">{_t(shown)}</text>'
            f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{w}" height="{row - 6}"'
            f' fill="{PALETTE[0]}"/>'
            f'<text x="{label_w + w + 4}" y="{y + 13}" font-family="{FONT}" font-size="11"'
            f' fill="{INK}">{value}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def stacked_columns(
    chart_id: str,
    title: str,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[int]]],
) -> str:
    """Columns per bucket (day or month), each stacked from the series' values."""
    height = 230
    segments = [
        (i, s, v) for s, (_, values) in enumerate(series) for i, v in enumerate(values) if v
    ]
    parts = _open(chart_id, title, height, len(segments))
    legend_x = 0
    for s, (name, _) in enumerate(series):
        parts.append(
            f'<rect x="{legend_x}" y="22" width="10" height="10" fill="{PALETTE[s % 7]}"/>'
            f'<text x="{legend_x + 14}" y="31" font-family="{FONT}" font-size="11"'
            f' fill="{INK}">{_t(name)}</text>'
        )
        legend_x += 24 + 7 * len(name)
    if not segments:
        return _empty(parts, height)
    left, bottom, top_y = 40, height - 30, 44
    plot_h = bottom - top_y
    totals = [sum(values[i] for _, values in series) for i in range(len(labels))]
    peak = max(totals) or 1
    slot = (WIDTH - left) / max(len(labels), 1)
    col = max(2.0, min(28.0, slot * 0.7))
    parts.append(
        f'<line x1="{left}" y1="{bottom}" x2="{WIDTH}" y2="{bottom}" stroke="{GRID}"'
        f' stroke-width="1"/>'
        f'<text x="{left - 4}" y="{top_y + 4}" font-family="{FONT}" font-size="10"'
        f' fill="{MUTED}" text-anchor="end">{peak}</text>'
        f'<text x="{left - 4}" y="{bottom}" font-family="{FONT}" font-size="10"'
        f' fill="{MUTED}" text-anchor="end">0</text>'
    )
    every = max(1, len(labels) // 8)
    for i, label in enumerate(labels):
        x = left + i * slot + (slot - col) / 2
        y = float(bottom)
        for s, (_, values) in enumerate(series):
            v = values[i]
            if not v:
                continue
            h = max(1.0, plot_h * v / peak)
            y -= h
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{col:.1f}" height="{h:.1f}"'
                f' fill="{PALETTE[s % 7]}"/>'
            )
        if i % every == 0:
            parts.append(
                f'<text x="{x + col / 2:.1f}" y="{bottom + 14}" font-family="{FONT}"'
                f' font-size="10" fill="{MUTED}" text-anchor="middle">{_t(label[5:] or label)}'
                "</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def timeline(
    chart_id: str, title: str, since_ms: int, until_ms: int, spans: Sequence[tuple[int, int]]
) -> str:
    """Intervals (start, end ms) on the period's time axis; each at least a hairline wide."""
    height = 90
    parts = _open(chart_id, title, height, len(spans))
    left, right, y = 10, WIDTH - 10, 40
    parts.append(
        f'<rect x="{left}" y="{y}" width="{right - left}" height="20" fill="#f0f4f8"'
        f' stroke="{GRID}" stroke-width="1"/>'
        f'<text x="{left}" y="{y + 36}" font-family="{FONT}" font-size="10"'
        f' fill="{MUTED}">{_utc(since_ms)}</text>'
        f'<text x="{right}" y="{y + 36}" font-family="{FONT}" font-size="10" fill="{MUTED}"'
        f' text-anchor="end">{_utc(until_ms)}</text>'
    )
    if not spans:
        parts.append(
            f'<text x="{WIDTH // 2}" y="{y + 14}" font-family="{FONT}" font-size="11"'
            f' fill="{MUTED}" text-anchor="middle">none in the period</text></svg>'
        )
        return "".join(parts)
    scale = (right - left) / max(until_ms - since_ms, 1)
    for start, end in spans:
        x = left + (start - since_ms) * scale
        w = max(2.0, (end - start) * scale)
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y}" width="{w:.1f}" height="20"'
            f' fill="{PALETTE[1]}"/>'
        )
    parts.append("</svg>")
    return "".join(parts)
