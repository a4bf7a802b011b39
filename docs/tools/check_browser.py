"""Open the built site in a headless Chromium with the network off, as a reader would, and fail on any
console error, page error, missing page or resource, or request that leaves this machine.

``python docs/tools/check_browser.py docs/_build/html [--screenshots DIR]`` serves the site on 127.0.0.1,
starts Debian's Chromium (``apt-get install chromium``; ``--chromium`` for another path) through Playwright
(no browser download: Playwright only drives the installed one) with every host name resolving nowhere, and
visits

- the start page;
- a search for ``CovPool`` (Sphinx's search runs in JavaScript: it waits for the results and checks one
  links to the API entry of :class:`covpool.CovPool`);
- an API page (``covpool.layers.CovPool``: its signature is there);
- a gallery page (its figure is there and has loaded);
- a page with math (the backends guide: MathJax, served by the site itself, has typeset every formula).

Playwright rather than Selenium: it reports console messages, page errors and every request as events,
so one handler catches a request for a CDN that the network-off browser would silently fail to load.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["CHROMIUM_ARGS", "check_site", "main"]

#: Chromium's switches for a machine without a network: no background connections, and every host name
#: but this machine's resolving to nothing
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # the browser left a page before it loaded
            super().handle_error(request, client_address)


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def check_site(root: Path, chromium: str, screenshots: Path | None = None, timeout_s: float = 30.0) -> list[str]:
    """One line per problem found while visiting the pages; empty when there is none."""
    from playwright.sync_api import Error, sync_playwright

    server, base = _serve(root)
    problems: list[str] = []
    current = {"page": ""}

    def note(text: str) -> None:
        problems.append(f"{current['page']}: {text}")

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
            context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")

            def route(route, request) -> None:
                if urlsplit(request.url).netloc == urlsplit(base).netloc or request.url.startswith(("data:", "blob:")):
                    route.continue_()
                else:
                    note(f"tried to load {request.url} from the network")
                    route.abort()

            context.route("**/*", route)
            page = context.new_page()
            page.set_default_timeout(timeout_s * 1000)
            page.on("console", lambda m: note(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: note(f"page error: {e}"))
            page.on("response", lambda r: note(f"{r.status} for {r.url}") if r.status >= 400 else None)
            # ERR_ABORTED: a request the page itself dropped when the next page was opened
            page.on("requestfailed", lambda r: note(f"request failed: {r.url} ({r.failure})")
                    if urlsplit(r.url).netloc == urlsplit(base).netloc and "ERR_ABORTED" not in (r.failure or "")
                    else None)

            def visit(path: str, check, name: str) -> None:
                current["page"] = path
                try:
                    response = page.goto(f"{base}/{path}", wait_until="load")
                    if response is None or response.status != 200:
                        note(f"missing page (status {response.status if response else 'none'})")
                        return
                    check()
                except (Error, AssertionError) as err:
                    note(f"{type(err).__name__}: {str(err).splitlines()[0]}")
                if screenshots is not None:
                    page.screenshot(path=str(screenshots / f"{name}.png"), full_page=False)

            def index() -> None:
                assert "covpool" in page.title(), f"title is {page.title()!r}"
                page.wait_for_selector("nav a[href*='guides/']", state="attached")

            def search() -> None:
                page.wait_for_selector("#search-results ul.search li a", state="attached")
                hrefs = page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.href)")
                assert any("covpool.layers.CovPool.html" in h for h in hrefs), f"no CovPool entry among {hrefs[:5]}"

            def api() -> None:
                page.wait_for_selector("dt.sig[id='covpool.layers.CovPool']", state="attached")

            def gallery() -> None:
                image = page.wait_for_selector("img.sphx-glr-single-img")
                assert page.evaluate("img => img.complete && img.naturalWidth > 0", image), "figure did not load"

            def math() -> None:
                page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
                page.evaluate("() => MathJax.startup.promise")
                typeset = page.locator("mjx-container").count()
                raw = page.locator(".math:not(:has(mjx-container))").count()
                assert typeset > 0 and raw == 0, f"{typeset} formulas typeset, {raw} left as TeX"
                errors = page.locator("mjx-merror").count()
                assert errors == 0, f"{errors} formulas MathJax could not typeset"

            visit("index.html", index, "index")
            visit("search.html?q=CovPool", search, "search")
            visit("api/generated/covpool.layers.CovPool.html", api, "api")
            visit("gallery/plot_spectrum.html", gallery, "gallery")
            visit("guides/backends.html", math, "math")
            browser.close()
    finally:
        server.shutdown()
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site, e.g. docs/_build/html")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium",
                        help="the Chromium executable (default: Debian's, /usr/bin/chromium)")
    parser.add_argument("--screenshots", type=Path, help="save a screenshot of each page visited into this folder")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"error: {args.site} has no index.html: build the site first (make docs)", file=sys.stderr)
        return 2
    if not Path(args.chromium).exists():
        print(f"error: no Chromium at {args.chromium}: apt-get install chromium (or pass --chromium PATH)",
              file=sys.stderr)
        return 2
    if args.screenshots is not None:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    problems = check_site(args.site, args.chromium, args.screenshots)
    for line in problems:
        print(line)
    print(f"5 pages visited in Chromium with the network off: {len(problems)} problem(s)" if problems else
          "5 pages visited in Chromium with the network off: no console error, nothing missing, nothing fetched "
          "from elsewhere")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
