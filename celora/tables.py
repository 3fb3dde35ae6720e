"""One table, four renderings: a pandas frame of display strings as rich, Markdown, CSV or HTML."""

from __future__ import annotations

from html import escape
from typing import Any

import pandas as pd
from rich.table import Table
from rich.text import Text


def frame_rich(frame: pd.DataFrame, title: str | None = None, left: int = 1) -> Table:
    """A rich table of ``frame`` (the first ``left`` columns left-aligned, the rest right-aligned)."""
    t = Table(title=title)
    for k, col in enumerate(frame.columns):
        t.add_column(str(col), justify="left" if k < left else "right")
    for row in frame.itertuples(index=False):
        t.add_row(*(Text(str(c)) for c in row))  # cells are text, never rich markup ("list[str]")
    return t


def frame_markdown(frame: pd.DataFrame, left: int = 1) -> str:
    """A GitHub Markdown table of ``frame`` ('|' in cells escaped)."""

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    cols = [cell(c) for c in frame.columns]
    align = ["---" if k < left else "---:" for k in range(len(cols))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def frame_html(frame: pd.DataFrame, left: int = 1) -> str:
    """An HTML ``<table>`` of ``frame`` (cells escaped; the first ``left`` columns left-aligned)."""

    def cells(values: Any, tag: str) -> str:
        return "".join(f"<{tag}{' class=l' if k < left else ''}>{escape(str(v))}</{tag}>" for k, v in enumerate(values))

    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{cells(frame.columns, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def frame_csv(frame: pd.DataFrame) -> str:
    """``frame`` as CSV text (header row, no index)."""
    return str(frame.to_csv(index=False))
