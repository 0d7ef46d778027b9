"""One self-contained HTML page from a markdown report: its tables as HTML tables, its plots embedded (base64
PNG), no scripts and no external files — it opens offline, in any browser, mailed or copied alone.

``compare``, ``suite`` reports and the scaling-law ``report`` write one beside their markdown
(``tests/test_htmlpage.py`` opens it in headless Chromium and reads the tables back).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from tunelab.files import atomic_write_text

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 82em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
td:not(:first-child) { font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def markdown_page(markdown_text: str, title: str, images_dir: Path, extra_images: Sequence[Path] = ()) -> str:
    """The HTML page of ``markdown_text``; images it names (relative to ``images_dir``) and ``extra_images`` are
    embedded."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"], output_format="html")

    def embed(match: re.Match[str]) -> str:
        src = html.unescape(match.group(2))
        path = images_dir / src
        if not path.is_file() or path.suffix.lower() != ".png":
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'{match.group(1)}"data:image/png;base64,{data}"'

    body = re.sub(r'(<img[^>]*?src=)"([^"]+)"', embed, body)
    for image in extra_images:
        if image.is_file():
            data = base64.b64encode(image.read_bytes()).decode("ascii")
            body += f'\n<p><img alt="{html.escape(image.stem)}" src="data:image/png;base64,{data}"></p>'
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_page(markdown_path: Path, out: Path | None = None, extra_images: Sequence[Path] = ()) -> Path:
    """``report.md`` -> ``report.html`` beside it (or ``out``)."""
    markdown_path = Path(markdown_path)
    text = markdown_path.read_text(encoding="utf-8")
    title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), markdown_path.stem)
    out = out or markdown_path.with_suffix(".html")
    atomic_write_text(out, markdown_page(text, title, markdown_path.parent, extra_images))
    return out
