"""Self-contained HTML pages of a run's Markdown tables, for Snakemake's report
(``snakemake --report results/report.html`` embeds each page with its caption)."""

from __future__ import annotations

import html

from markdown_it import MarkdownIt

#: plain, readable styling; the page embeds it (the report has no other files)
STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
"""


def markdown_page(markdown: str, title: str) -> str:
    """One HTML page rendering ``markdown`` (headings, paragraphs, pipe tables)."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n")
