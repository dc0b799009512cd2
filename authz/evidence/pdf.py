"""``report.pdf`` with fpdf2 (pure Python): the same blocks as the HTML, the same SVG
charts (fpdf2 draws SVG itself). The core PDF fonts are Latin-1 only, so any other
character is written as ``\\uXXXX``, as the archive writes it; nothing is dropped."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.fonts import FontFace

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

_FONT = "Helvetica"
_TITLE = re.compile(r"<title>.*?</title>")  # fpdf2 draws no <title>; it would log each one


def latin1(text: str) -> str:
    return "".join(
        c if (0x20 <= ord(c) < 0x7F) or (0xA0 <= ord(c) <= 0xFF) else f"\\u{ord(c):04x}"
        for c in text
    )


class _Pdf(FPDF):
    footer_text = ""

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(_FONT, size=8)
        self.set_text_color(97, 110, 124)
        self.cell(0, 8, latin1(f"{self.footer_text}  -  page {self.page_no()}/{{nb}}"), align="C")


def _table(pdf: FPDF, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    pdf.set_font(_FONT, size=7.5)
    width = pdf.epw
    # Columns sized by their longest text (bounded), so narrow figures stay narrow.
    longest = [
        max([len(columns[i]), *(min(len(r[i]), 60) for r in rows)]) + 2 for i in range(len(columns))
    ]
    total = sum(longest)
    widths = tuple(width * n / total for n in longest)
    with pdf.table(
        col_widths=widths,
        text_align="LEFT",
        line_height=pdf.font_size * 1.5,
        first_row_as_headings=True,
        headings_style=FontFace(emphasis="BOLD", fill_color=(240, 244, 248)),
    ) as table:
        table.row([latin1(c) for c in columns])
        for r in rows:
            table.row([latin1(c if len(c) <= 400 else c[:397] + "...") for c in r])
    pdf.ln(2)


def render_pdf(report: Report) -> tuple[bytes, int]:
    """The PDF's bytes and its page count."""
    pdf = _Pdf(orientation="portrait", unit="mm", format="A4")
    pdf.footer_text = report.title
    pdf.set_auto_page_break(auto=True, margin=16)
    pdf.set_margins(14, 14, 14)
    pdf.set_title(latin1(report.title))
    pdf.set_creator("stepup-authz evidence")
    pdf.add_page()
    pdf.set_font(_FONT, "B", 15)
    pdf.multi_cell(0, 8, latin1(report.title), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    for block in report.blocks:
        if isinstance(block, Heading):
            if block.level == 2 and pdf.get_y() > pdf.h - 60:
                pdf.add_page()
            pdf.ln(3 if block.level == 2 else 1)
            pdf.set_font(_FONT, "B", 12.5 if block.level == 2 else 10)
            pdf.set_text_color(31, 41, 51)
            pdf.multi_cell(0, 6, latin1(block.text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        elif isinstance(block, Para):
            pdf.set_font(_FONT, size=9)
            pdf.set_text_color(*((97, 110, 124) if block.muted else (31, 41, 51)))
            pdf.multi_cell(0, 4.5, latin1(block.text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.set_text_color(31, 41, 51)
            pdf.ln(1)
        elif isinstance(block, Banner):
            pdf.set_font(_FONT, "B", 10)
            if block.ok:
                pdf.set_fill_color(227, 249, 229)
                pdf.set_text_color(31, 41, 51)
            else:
                pdf.set_fill_color(255, 227, 227)
                pdf.set_text_color(138, 28, 28)
            pdf.multi_cell(
                0,
                5.5,
                latin1(block.text),
                border=1,
                fill=True,
                padding=2,
                new_x=XPos.LMARGIN,
                new_y=YPos.NEXT,
            )
            pdf.set_text_color(31, 41, 51)
            pdf.set_fill_color(255, 255, 255)
            pdf.ln(2)
        elif isinstance(block, Figures):
            _table(pdf, ("figure", "value"), block.pairs)
        elif isinstance(block, Table):
            if not block.rows:
                pdf.set_font(_FONT, "I", 8.5)
                pdf.multi_cell(0, 4.5, latin1(block.empty), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
                continue
            _table(pdf, block.columns, block.rows)
        elif isinstance(block, Chart):
            width = pdf.epw
            if pdf.get_y() > pdf.h - 70:
                pdf.add_page()
            svg = _TITLE.sub("", block.svg)
            pdf.image(io.BytesIO(svg.encode("ascii")), x=pdf.l_margin, w=width)
            pdf.ln(2)
        elif isinstance(block, PageBreak):
            pdf.add_page()
    return bytes(pdf.output()), pdf.page_no()
