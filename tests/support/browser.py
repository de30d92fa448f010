"""The MLflow UI in a real headless Chromium: `mlflow ui` on 127.0.0.1 and a Selenium driver that reaches nothing
but loopback. Selenium, chromedriver and chromium are optional: `missing()` gives a test its skip reason."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.support.raycluster import free_ports

CHROMIUM = os.environ.get("VITLAB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("VITLAB_CHROMEDRIVER", "/usr/bin/chromedriver")

# Any host but loopback fails to resolve, and Chrome's own services (updates, sync, field trials, safe
# browsing, translate) stay off: a test run never sends traffic off this machine.
CHROME_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1600,1000",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--no-proxy-server",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-extensions", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--disable-breakpad", "--no-first-run", "--no-default-browser-check", "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication", "--password-store=basic"]


def missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    absent = [f"{path} (apt-get install {pkg})" for path, pkg in ((CHROMIUM, "chromium"),
              (CHROMEDRIVER, "chromium-driver")) if not os.access(path, os.X_OK)]
    return f"not found: {', '.join(absent)}" if absent else None


@contextlib.contextmanager
def mlflow_ui(backend_store_uri: str, artifacts_root: str | None = None, timeout: float = 60.0) -> Iterator[str]:
    """`mlflow ui` on a free loopback port, yielding its base URL; no telemetry, no tracking URI inherited, no job
    runner (its ~8 huey consumers triple the start-up time on 2 cores, and the UI does not need them). Its own
    session: killing its process group at exit ends the uvicorn/gunicorn workers too."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend_store_uri,
           "--host", "127.0.0.1", "--port", str(port := free_ports(1)[0]), "--workers", "1"]
    cmd += ["--default-artifact-root", artifacts_root] if artifacts_root else []
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no telemetry: tests/conftest.py turns it off
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
        try:
            while True:
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{base}/health", timeout=2):
                    break  # answered 200 (anything else raises HTTPError, an OSError)
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"mlflow ui not up in {timeout:.0f}s (exit {proc.poll()}): {log.read()[-2000:]}")
                time.sleep(0.3)
            yield base
        finally:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    # SIGTERM lets uvicorn stop its workers; SIGKILL then reaches any that outlived the leader (same group id)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@contextlib.contextmanager
def headless_chromium() -> Iterator[Any]:
    """Selenium on Debian's chromium and chromedriver, with a fresh profile (no UI state carries over). Explicit
    paths and SE_OFFLINE: Selenium Manager never downloads a browser or a driver."""
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        for arg in [*CHROME_ARGS, f"--user-data-dir={profile}"]:
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(60)
            yield driver
        finally:
            driver.quit()


def wait_until(driver, condition: Callable[[Any], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``condition(driver)`` until truthy and return that; on timeout, say what, the last error, the page text."""
    from selenium.common.exceptions import WebDriverException

    deadline, error = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            if value := condition(driver):
                return value
        except (WebDriverException, LookupError) as e:  # React re-rendering; a row or cell not there yet
            error = e
        time.sleep(0.25)
    raise AssertionError(f"{what}: not in {timeout:.0f}s on {driver.current_url} ({error}):\n{body_text(driver)[:999]}")


def body_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def wait_for_text(driver, text: str, timeout: float = 60.0) -> None:
    """Wait until ``text`` is in the page's visible text (innerText: what a person reads, not hidden markup)."""
    wait_until(driver, lambda d: text in body_text(d), timeout, what=repr(text))


def open_page(driver, url: str, text: str | None = None, timeout: float = 60.0) -> None:
    """Load ``url`` afresh (via about:blank: a hash change alone does not reload the app); wait for ``text``."""
    driver.get("about:blank")
    driver.get(url)
    if text:
        wait_for_text(driver, text, timeout)


def screenshot(driver, path: str | Path, copy_to: str | Path | None = None) -> Path:
    """PNG of the viewport at ``path``, and a copy in the folder ``copy_to`` (for a person to look at)."""
    for folder in (Path(path).parent, *([Path(copy_to)] if copy_to else [])):
        folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    if copy_to:
        shutil.copy(path, copy_to)
    return Path(path)


def active_tab(driver) -> str | None:
    return driver.execute_script("return document.querySelector('[role=tab][aria-selected=true]')?.innerText")


# --- the MLflow UI's own DOM (mlflow 3.17) ---

def close_assistant(driver) -> None:
    # open by default; closed, the page gets the full width: fewer grid columns virtualised away, clearer shots
    driver.execute_script("document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")


def grid_rows(driver) -> dict[str, dict]:
    """The runs table's rendered rows by run id: index (display order), name, name_x (its left edge: children are
    indented), expandable (has the expand button), cells ({col-id: text}). An ag-grid: a row's pinned-left and
    centre parts (same row-id) are merged here; rows and columns scrolled out of view are not in the DOM."""
    return driver.execute_script("""
      const rows = {};
      for (const r of document.querySelectorAll('.ag-root [role=row][row-id]')) {
        const row = rows[r.getAttribute('row-id')] ||= {index: +r.getAttribute('row-index'), cells: {}};
        for (const c of r.querySelectorAll('[role=gridcell][col-id]')) {
          row.cells[c.getAttribute('col-id')] = c.innerText;
          const link = c.querySelector('a[href*="/runs/"]');
          if (link) Object.assign(row, {name: link.innerText, name_x: link.getBoundingClientRect().left,
                                        expandable: !!c.querySelector('button')});
        }
      }
      return rows;""")


def expand_run(driver, run_id: str) -> bool:
    """Click the expand/collapse button by ``run_id``'s name; False when it has none (no child runs)."""
    return driver.execute_script("""
      for (const c of document.querySelectorAll(`.ag-root [role=row][row-id="${arguments[0]}"] [role=gridcell]`)) {
        const button = c.querySelector('a[href*="/runs/"]') && c.querySelector('button');
        if (button) return button.click() ?? true;
      }
      return false;""", run_id)


def chart_traces(driver, title: str) -> list[dict] | None:
    """The Plotly traces of the metric chart card titled ``title`` as [{name, mode, x, y, points: markers drawn}];
    None until drawn. Cards are drawn only once in view, so the card is scrolled there."""
    return driver.execute_script("""
      for (const card of document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]')) {
        if (card.innerText.split('\\n')[0].trim() !== arguments[0]) continue;
        card.scrollIntoView({block: 'center'});
        const gd = card.querySelector('.js-plotly-plot'), drawn = card.querySelectorAll('.scatterlayer .trace');
        if (!gd || !gd.data || !gd.data.length) return null;
        return gd.data.map((t, i) => ({name: t.name, mode: t.mode, x: Array.from(t.x || []), y: Array.from(t.y || []),
                                       points: drawn[i] ? drawn[i].querySelectorAll('.points path.point').length : 0}));
      }
      return null;""", title)


def scroll_down(driver, pixels: int = 600) -> None:
    """Scroll every scrollable area down: chart cards out of view are not rendered (a run has a card per metric)."""
    driver.execute_script("""
      for (const el of [document.scrollingElement, ...document.querySelectorAll('*')]) {
        if (el && el.scrollHeight > el.clientHeight + 10 && getComputedStyle(el).overflowY !== 'hidden')
          el.scrollTop += arguments[0];
      }""", pixels)


def find_chart(driver, title: str) -> list[dict] | None:
    """``chart_traces`` of the card titled ``title``, scrolling down a step while it is not there yet."""
    traces = chart_traces(driver, title)
    if traces is None:
        scroll_down(driver)
    return traces


def artifact_names(driver) -> list[str]:
    """The names in an Artifacts tab's file tree (top level, and a folder's contents once it is expanded)."""
    return driver.execute_script("return Array.from(document.querySelectorAll('[data-testid=artifact-tree-node]'))"
                                 ".map(n => n.getAttribute('artifact-name'))")
