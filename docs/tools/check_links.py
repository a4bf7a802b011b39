"""Check a built site: every internal link and anchor resolves, and nothing is loaded from the network.

``python docs/tools/check_links.py docs/_build/html`` reads every HTML page of the site and reports

- a link (``href``) or resource (``src``) to a file of the site that does not exist;
- a link to an anchor (``page.html#name``, ``#name``) that the target page does not define;
- a script, stylesheet, image, font, frame or ``@import``/``url(...)`` in a page or a stylesheet of the site
  that would be fetched from another host (links *to* other sites, ``<a href="https://...">``, are fine: a
  reader follows them, the page does not load them).

Sphinx's ``linkcheck`` builder checks only external links, and needs the network; this needs neither.
Exit status 1 with one line per problem, 0 when there is none.
"""
from __future__ import annotations

import argparse
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["Page", "read_page", "check_site", "main"]

#: attributes through which a page makes the browser fetch something (``href`` of ``<a>`` is only a link)
_LOADS = {("script", "src"), ("img", "src"), ("iframe", "src"), ("source", "src"), ("video", "src"),
          ("audio", "src"), ("embed", "src"), ("object", "data"), ("input", "src"), ("link", "href")}
_LINK_RELS_NOT_LOADED = {"canonical", "alternate", "author", "license", "help", "search", "next", "prev", "index"}
_CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])([^'")\s]+)""")


class Page(HTMLParser):
    """The anchors a page defines, the links it holds and the resources it loads."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.loads: list[str] = []
        self._in_style = False
        self.styles: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        for key in ("id", "name") if tag in ("a", "span", "div", "section", "dt", "dl") else ("id",):
            if values.get(key):
                self.ids.add(values[key])
        if values.get("style"):
            self.styles.append(values["style"])
        if tag == "style":
            self._in_style = True
        if tag == "a" and "href" in values:
            self.links.append(values["href"])
        rel = set(values.get("rel", "").lower().split())
        for load_tag, attr in _LOADS:
            if tag == load_tag and values.get(attr):
                if tag == "link" and rel and rel <= _LINK_RELS_NOT_LOADED:
                    self.links.append(values[attr])
                else:
                    self.loads.append(values[attr])
        if values.get("srcset"):
            self.loads += [part.split()[0] for part in values["srcset"].split(",") if part.strip()]

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)


def read_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def _is_external(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.scheme in ("http", "https") or (not parts.scheme and url.startswith("//")))


def _skipped(url: str) -> bool:
    return urlsplit(url).scheme in ("mailto", "javascript", "data", "tel") or url in ("", "#")


def check_site(root: Path) -> list[str]:
    """One line per broken internal link or anchor, and per resource fetched from another host."""
    root = root.resolve()
    # _static holds the theme's HTML templates, not pages
    pages = {path: read_page(path) for path in sorted(root.rglob("*.html")) if "_static" not in path.parts}
    problems = []

    def where(path: Path) -> str:
        return str(path.relative_to(root))

    def resolve(page_path: Path, url: str) -> tuple[Path, str]:
        parts = urlsplit(url)
        target = page_path if not parts.path else (page_path.parent / unquote(parts.path)).resolve()
        if parts.path.endswith("/") or target.is_dir():
            target = target / "index.html"
        return target, unquote(parts.fragment)

    for path, page in pages.items():
        for url in page.loads:
            if _is_external(url):
                problems.append(f"{where(path)}: loads {url} from the network")
            elif not _skipped(url):
                target, _ = resolve(path, url)
                if not target.is_file():
                    problems.append(f"{where(path)}: loads {url}, which is not in the site")
        for style in page.styles:
            problems += [f"{where(path)}: inline style loads {u} from the network"
                         for u in _CSS_URL.findall(style) if _is_external(u)]
        for url in page.links:
            if _skipped(url) or _is_external(url):
                continue
            target, fragment = resolve(path, url)
            if not target.is_file():
                problems.append(f"{where(path)}: link to {url}: no such file")
            elif fragment and target.suffix == ".html":
                defined = pages[target].ids if target in pages else read_page(target).ids
                if fragment not in defined:
                    problems.append(f"{where(path)}: link to {url}: {where(target)} has no anchor {fragment!r}")
    for css in sorted(root.rglob("*.css")):
        for url in _CSS_URL.findall(css.read_text(encoding="utf-8", errors="replace")):
            if _is_external(url):
                problems.append(f"{where(css)}: loads {url} from the network")
            elif not _skipped(url):
                target = (css.parent / unquote(urlsplit(url).path)).resolve()
                if not target.is_file():
                    problems.append(f"{where(css)}: loads {url}, which is not in the site")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site, e.g. docs/_build/html")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"error: {args.site} has no index.html: build the site first (make docs)", file=sys.stderr)
        return 2
    problems = check_site(args.site)
    for line in problems:
        print(line)
    count = sum("_static" not in p.parts for p in args.site.rglob("*.html"))
    print(f"{count} pages checked: {len(problems)} problem(s)" if problems else
          f"{count} pages checked: every internal link and anchor resolves, nothing loads from the network")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
