"""report.html: one self-contained page (tables as HTML tables, plots embedded, nothing external), opened in
headless Chromium and its tables read back (skipped where no Chromium is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tunelab.htmlpage import write_page

MD = """# A comparison

`tunelab compare x.yaml` · commit abc1234

| row | method | accuracy |
|---|---|---|
| lora | lora | 51.1 [48.0, 54.2] |
| base | none | 12.8 |

![chart](chart.png)
"""


class Tables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "img":
            self.images.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _page(tmp_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2], [3, 4])
    fig.savefig(tmp_path / "chart.png")
    plt.close(fig)
    (tmp_path / "table.md").write_text(MD)
    return write_page(tmp_path / "table.md", tmp_path / "report.html")


def _check(html_text: str) -> None:
    parsed = Tables()
    parsed.feed(html_text)
    assert parsed.tables == [[["row", "method", "accuracy"], ["lora", "lora", "51.1 [48.0, 54.2]"],
                              ["base", "none", "12.8"]]]
    assert len(parsed.images) == 1 and parsed.images[0].startswith("data:image/png;base64,")
    assert not re.search(r'(src|href)="(?!data:)', html_text)  # nothing external


def test_page_is_self_contained(tmp_path):
    _check(_page(tmp_path).read_text())


def test_page_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    page = _page(tmp_path)
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"--user-data-dir={tmp_path / 'profile'}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    _check(out.stdout)  # the DOM the browser built holds the same tables and the embedded chart
