"""The HTML pages of Snakemake's report: a table's Markdown rendered as a real HTML table."""

from html.parser import HTMLParser

from quari.reporting.html import markdown_page


class Cells(HTMLParser):
    """Collects table rows (lists of cell texts) and the title, by the standard library's parser."""

    def __init__(self):
        super().__init__()
        self.rows, self.title, self._in, self._cell = [], "", None, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "title":
            self._in = "title"

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "title":
            self._in = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._in == "title":
            self.title += data


def test_markdown_table_becomes_an_html_table():
    markdown = ("# Table 1: ILIAS <retrieval>\n\nCells: ours (paper).\n\n"
                "| backbone | method | i2i mAP@1k |\n|---|---|---|\n"
                "| syn-b256 (synthetic) | QuARI (H 64, 1 layer; CPU-size) | 30.92 |\n"
                "| siglip | QuARI † | – (35.3) |\n")
    page = markdown_page(markdown, "Table 1: ILIAS <retrieval>")
    parsed = Cells()
    parsed.feed(page)
    assert parsed.title == "Table 1: ILIAS <retrieval>"
    assert "<retrieval>" not in page  # escaped, in the head and in the body
    assert parsed.rows == [["backbone", "method", "i2i mAP@1k"],
                           ["syn-b256 (synthetic)", "QuARI (H 64, 1 layer; CPU-size)", "30.92"],
                           ["siglip", "QuARI †", "– (35.3)"]]
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page  # self-contained
