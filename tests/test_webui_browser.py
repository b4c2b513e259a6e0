"""The "Private style (DP)" tab in a real browser, in a real Forge (skipped unless ``FORGE_DIR``).

Headless Chromium (Debian's ``chromium``, or ``DPAGG_CHROMIUM``) driven by Python ``playwright``
(no browser download), against the Forge that ``test_webui_forge.py``'s fixture starts (the same
``FORGE_DIR`` setup). As a user would: type the private folder (the plan waits until the path is
complete: no scan per keystroke), switch the privacy target (the other field hides), click Train
and release without a budget (asked for), with one (progress in the WebUI's bar, the result, the
64 px preview grid with its labels), again (the identical request: the plan does not call it a
refusal, the ledger serves its record), over budget (red plan, refused), then open txt2img's
Textual Inversion pane (opened once before the release, without the card): the new card is there
without a manual refresh. Leaving a number field recomputes the plan (the budget line changes).
64 px, 2 TI steps, 3 images. Screenshots go to ``$DPAGG_SCREENSHOTS`` (default: a temporary
folder; printed, -s).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_webui_forge import forge, private, write_images  # noqa: F401 - the Forge fixture

CHROMIUM = os.environ.get("DPAGG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
NAME = "dpaggweb"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("FORGE_DIR"), reason="set FORGE_DIR (forge-env.sh)"),
]
RUN_TIMEOUT_MS = 600_000


def test_forge_tab_in_a_browser(forge, tmp_path):  # noqa: F811 - the imported fixture
    playwright = pytest.importorskip("playwright.sync_api")
    assert Path(CHROMIUM).exists(), "apt-get install chromium (or set DPAGG_CHROMIUM)"
    shots = Path(os.environ.get("DPAGG_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    folder = write_images(private(forge["data"], "browser"), 3, seed=11)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            drive(page, f"http://127.0.0.1:{forge['port']}/", folder, shots, timings)
            assert not [e for e in errors if "dpagg" in e.lower()], errors
        finally:
            browser.close()
    timings["browser_total_s"] = time.perf_counter() - t0
    print("\nBROWSER TIMINGS:", {k: round(v, 1) for k, v in timings.items()})
    print("SCREENSHOTS:", "\n".join(str(p) for p in sorted(shots.glob("*.png"))))


def drive(page, url: str, folder: Path, shots: Path, timings: dict[str, float]) -> None:
    """The user's path through the tab (module docstring); asserts on what the page shows."""
    from playwright.sync_api import expect

    def shot(name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    def number(label: str, value: float) -> None:  # type, then leave the field (blur)
        field = page.locator("#tab_dpagg").get_by_role("spinbutton", name=label, exact=True)
        field.fill(str(value))
        field.press("Tab")

    def train(expect_text: str, key: str, progress: bool = False) -> None:
        t = time.perf_counter()
        page.locator("#dpagg_run").click()
        if progress:  # the WebUI's own progress bar, with dpagg's text
            bar = page.locator("#tab_dpagg .progressDiv")
            expect(bar).to_contain_text("per-image TI", timeout=RUN_TIMEOUT_MS)
            shot("03-progress")
        expect(result).to_contain_text(expect_text, timeout=RUN_TIMEOUT_MS)
        expect(page.locator("#tab_dpagg .progressDiv")).to_have_count(0, timeout=60_000)
        timings[key] = time.perf_counter() - t

    def textual_inversion_cards():  # txt2img's Textual Inversion extra-networks pane
        page.locator("#tabs > .tab-nav > button", has_text="Txt2img").click()
        pane = page.locator("#txt2img_extra_tabs > .tab-nav > button", has_text="Textual Inversion")
        pane.click()
        return page.locator(f"#txt2img_textual_inversion_cards_html .card[data-name='{NAME}']")

    t = time.perf_counter()
    page.goto(url, timeout=120_000)
    # item 8: the pane is listed (once, when the page loads; the WebUI keeps that list until a
    # refresh) and opened before the release, as a user who looked at it first would have it;
    # the new card must show there later without a manual refresh
    before = textual_inversion_cards()
    expect(page.locator("#txt2img_textual_inversion_cards")).to_be_attached(timeout=60_000)
    expect(before).to_have_count(0)
    page.locator("#tabs > .tab-nav > button", has_text="Private style (DP)").click()
    plan = page.locator("#dpagg_plan")
    result = page.locator("#dpagg_result")
    expect(plan).to_contain_text("choose the private image folder", timeout=60_000)
    timings["page_load_s"] = time.perf_counter() - t

    # item 12: the privacy target not chosen is hidden
    eps, noise = page.locator("#dpagg_epsilon"), page.locator("#dpagg_noise_multiplier")
    expect(eps).to_be_visible()
    expect(noise).to_be_hidden()
    page.locator("#dpagg_mode").get_by_text("noise_multiplier").click()
    expect(noise).to_be_visible()
    expect(eps).to_be_hidden()
    page.locator("#dpagg_mode").get_by_text("epsilon", exact=True).click()
    expect(eps).to_be_visible()
    expect(noise).to_be_hidden()

    # item 11: typing the path scans nothing; Enter (or leaving the field) does, once
    box = page.locator("#dpagg_images textarea")
    box.click()
    box.press_sequentially(str(folder), delay=15)
    time.sleep(1.5)
    expect(plan).to_contain_text("choose the private image folder")
    expect(plan).not_to_contain_text("no images")
    box.press("Enter")
    expect(plan).to_contain_text("3 private images", timeout=60_000)

    name = page.locator("#tab_dpagg").get_by_label("Embedding name (the prompt word)")
    name.fill(NAME)
    name.press("Tab")
    number("epsilon", 2)
    number("Clip norm C (public)", 0.5)
    page.locator("#tab_dpagg").get_by_text("Per-image textual inversion").click()
    number("TI steps", 2)
    number("resolution (0 = the model's)", 64)
    number("batch size", 4)
    page.locator("#tab_dpagg").get_by_text("Preview grid").click()
    number("preview steps", 2)
    number("preview size (0 = the model's)", 64)

    # item 10: the first release needs a deliberate budget
    expect(plan).to_contain_text("budget epsilon: choose the total epsilon", timeout=30_000)
    shot("01-plan-budget-required")
    train("Nothing released", "refused_without_budget_s")
    expect(result).to_contain_text("before its first release")
    number("budget epsilon: total epsilon this image set may ever spend", 2)
    expect(plan).to_contain_text("this first release sets the budget to epsilon 2")
    # the refusal was for the old fields: the plan refresh cleared it (no red under a good plan)
    expect(result).not_to_contain_text("Nothing released", timeout=30_000)
    shot("02-plan-with-budget")

    train("released a new differentially private embedding", "first_release_s", progress=True)
    expect(result).to_contain_text(f"{NAME}.safetensors")
    grid = page.locator("#dpagg_preview img")
    expect(grid).to_be_visible(timeout=60_000)
    # item 12: 64 px cells are enlarged so the column labels fit (the grid is wider than two raw
    # cells), and no gradio label badge is drawn over the grid's own "without" label
    assert grid.evaluate("img => img.naturalWidth") > 2 * 64
    expect(page.locator("#dpagg_preview").get_by_text("Preview: without")).to_have_count(0)
    shot("04-released")

    # item 10: the identical request is not announced as a refusal, and is served
    expect(plan).to_contain_text("identical re-run", timeout=30_000)
    expect(plan).not_to_contain_text("will be refused")
    train("re-used the identical earlier release", "identical_rerun_s")
    shot("05-identical-rerun")

    # over budget: red plan, refused, nothing spent
    number("epsilon", 1)
    expect(plan).to_contain_text("will be refused", timeout=30_000)
    train("Nothing released", "over_budget_refusal_s")
    expect(result).to_contain_text("budget")
    shot("06-over-budget-refused")

    # item 8: the new card is in txt2img's Textual Inversion pane, no manual refresh
    card = textual_inversion_cards()
    expect(card).to_have_count(1, timeout=30_000)
    card.scroll_into_view_if_needed()
    shot("07-txt2img-card")
