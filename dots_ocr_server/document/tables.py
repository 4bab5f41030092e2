"""HTML tables as the model writes them (``<table><thead><tr><th>...``): their rows and column
count, and two tables merged into one, for :func:`.joins.merge_table`.

Parsed with the standard library's ``html.parser`` (tolerant of the model's unclosed tags and
entities, and no dependency of the torch-free client side); the row and column logic on top of it
is ours. A table is only re-serialised when it is merged: an unmerged table keeps its HTML as
the model wrote it.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from html.parser import HTMLParser

__all__ = ["HtmlTable", "merge_table_html", "parse_table"]

_CELL_TAGS = ("td", "th")
_SECTIONS = ("thead", "tbody", "tfoot")


@dataclass
class HtmlCell:
    tag: str                       # "td" or "th"
    attrs: list[tuple[str, str | None]]
    inner: list[str] = field(default_factory=list)  # the cell's content, as HTML pieces
    text: list[str] = field(default_factory=list)   # the cell's text, for comparing header rows

    def span(self, name: str) -> int:
        value = dict(self.attrs).get(name)
        try:
            return max(1, int(str(value).strip()))
        except (TypeError, ValueError):
            return 1

    def plain_text(self) -> str:
        return " ".join("".join(self.text).split()).casefold()

    def to_html(self) -> str:
        attrs = "".join(f' {name}="{html.escape(value, quote=True)}"' if value is not None else f" {name}"
                        for name, value in self.attrs)
        return f"<{self.tag}{attrs}>{''.join(self.inner)}</{self.tag}>"


@dataclass
class HtmlRow:
    section: str                   # "thead", "tbody", "tfoot" or "" (rows straight in <table>)
    cells: list[HtmlCell] = field(default_factory=list)

    def texts(self) -> tuple[str, ...]:
        return tuple(cell.plain_text() for cell in self.cells)

    def to_html(self) -> str:
        return "<tr>" + "".join(cell.to_html() for cell in self.cells) + "</tr>"


@dataclass
class HtmlTable:
    rows: list[HtmlRow]

    @property
    def header_rows(self) -> list[HtmlRow]:
        """The ``<thead>`` rows; without a ``<thead>``, the first row when all its cells are
        ``<th>``; else none."""
        head = [row for row in self.rows if row.section == "thead"]
        if head:
            return head
        first = self.rows[0] if self.rows else None
        if first is not None and first.cells and all(cell.tag == "th" for cell in first.cells):
            return [first]
        return []

    @property
    def body_rows(self) -> list[HtmlRow]:
        head = self.header_rows
        return [row for row in self.rows if not any(row is h for h in head)]

    def column_count(self) -> int:
        """Columns of the widest row, counting ``colspan`` and the columns that ``rowspan`` cells
        of earlier rows still cover."""
        covered: dict[int, int] = {}  # column -> rows it stays covered, from a rowspan above
        width = 0
        for row in self.rows:
            taken = {column for column, rows_left in covered.items() if rows_left > 0}
            column = 0
            for cell in row.cells:
                while column in taken:
                    column += 1
                colspan, rowspan = cell.span("colspan"), cell.span("rowspan")
                for offset in range(colspan):
                    if rowspan > 1:
                        covered[column + offset] = rowspan  # this row included, decremented below
                column += colspan
            width = max(width, column, max(taken, default=-1) + 1)
            covered = {c: n - 1 for c, n in covered.items() if n - 1 > 0}
        return width


class _TableParser(HTMLParser):
    """Collects the rows of one ``<table>``; ``failed`` when the HTML is not one plain table
    (several tables, a table inside a cell)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables = 0
        self.depth = 0
        self.failed = False
        self.section = ""
        self.rows: list[HtmlRow] = []
        self.row: HtmlRow | None = None
        self.cell: HtmlCell | None = None

    def _close_cell(self) -> None:
        self.cell = None

    def _close_row(self) -> None:
        self._close_cell()
        self.row = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables += 1
            self.depth += 1
            if self.tables > 1 or self.cell is not None:
                self.failed = True
        elif self.depth == 0 or self.failed:
            return
        elif tag in _SECTIONS:
            self._close_row()
            self.section = tag
        elif tag == "tr":
            self._close_row()
            self.row = HtmlRow(self.section)
            self.rows.append(self.row)
        elif tag in _CELL_TAGS:
            self._close_cell()
            if self.row is None:  # a cell straight under <table>: open the row it implies
                self.row = HtmlRow(self.section)
                self.rows.append(self.row)
            self.cell = HtmlCell(tag, list(attrs))
            self.row.cells.append(self.cell)
        elif self.cell is not None:
            self.cell.inner.append(self.get_starttag_text() or f"<{tag}>")

    def handle_startendtag(self, tag, attrs):
        if self.cell is not None and not self.failed:
            self.cell.inner.append(self.get_starttag_text() or f"<{tag}/>")
            if tag == "br":
                self.cell.text.append(" ")

    def handle_endtag(self, tag):
        if tag == "table":
            self.depth = max(0, self.depth - 1)
            self._close_row()
        elif tag in _SECTIONS:
            self._close_row()
            self.section = ""
        elif tag == "tr":
            self._close_row()
        elif tag in _CELL_TAGS:
            self._close_cell()
        elif self.cell is not None:
            self.cell.inner.append(f"</{tag}>")

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.inner.append(html.escape(data, quote=False))
            self.cell.text.append(data)


def parse_table(markup: str) -> HtmlTable | None:
    """The rows of the one ``<table>`` in ``markup``; None when there is no table, more than one,
    a nested table, or no row."""
    parser = _TableParser()
    parser.feed(markup)
    parser.close()
    if parser.failed or parser.tables != 1 or not parser.rows:
        return None
    return HtmlTable(parser.rows)


def _repeats_header(header: list[HtmlRow], rows: list[HtmlRow]) -> bool:
    return bool(header) and len(rows) >= len(header) and all(
        a.texts() == b.texts() for a, b in zip(header, rows))


def merge_table_html(first: str, second: str, *, drop_repeated_header: bool = True) -> str | None:
    """``second`` appended to ``first`` as one table, or None when they cannot be merged (either is
    not one plain table, or their column counts differ).

    The merged table keeps ``first``'s header rows in a ``<thead>``; ``second``'s rows follow
    ``first``'s body rows. With ``drop_repeated_header``, ``second``'s leading rows are dropped
    when they repeat ``first``'s header rows (the same cell texts, ignoring case and spacing; a
    table without a header row compares its first row)."""
    top, bottom = parse_table(first), parse_table(second)
    if top is None or bottom is None or top.column_count() != bottom.column_count():
        return None
    header = top.header_rows
    rows = list(bottom.rows)
    if drop_repeated_header and _repeats_header(header or top.rows[:1], rows):
        rows = rows[len(header or top.rows[:1]):]
    head_html = "".join(row.to_html() for row in header)
    body_html = "".join(row.to_html() for row in top.body_rows + rows)
    return ("<table>" + (f"<thead>{head_html}</thead>" if head_html else "")
            + f"<tbody>{body_html}</tbody></table>")
