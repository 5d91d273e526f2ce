"""`report.html` in a real browser: headless Chromium driven by selenium (marker `browser`; Debian's
`chromium` and `chromium-driver`, which `.ci/run` installs), opened from disk in a copy of the run folder.

The page must load with no console error; its forest plot must draw one interval per paired difference of
`summary.json`, where the axis puts that difference's interval (read back through the panel's tick labels);
and a screenshot of it is not blank.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.config.loading import load_config
from pipelines.stages import report
from tests.test_report_html import finished_run

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = "chromium", "chromedriver"
INSTALL = "apt-get install chromium chromium-driver (`.ci/run` does) and the dev extra's selenium"

# For each interval-N of the forest plot: its ends in the SVG's units, and the panel's tick labels with their
# x positions, so that the test maps the ends back to the axis' values.
INTERVALS = """
return Array.from(document.querySelectorAll('#forest g[id^="interval-"]')).map(function (group) {
  var panel = group.closest('g[id^="axes_"]');
  var box = group.getBBox();
  var ticks = Array.from(panel.querySelectorAll('g[id^="xtick_"]')).map(function (tick) {
    var label = tick.querySelector('text');
    var mark = tick.querySelector('use');
    return [label.textContent, parseFloat(mark.getAttribute('x'))];
  });
  return {id: group.id, left: box.x, right: box.x + box.width, ticks: ticks};
});
"""


@pytest.fixture
def browser():
    reason = None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        reason = f"needs selenium: {INSTALL}"
    chromium, driver_path = shutil.which(CHROMIUM), shutil.which(CHROMEDRIVER)
    if reason is None and (chromium is None or driver_path is None):
        reason = f"needs Chromium and its driver ({CHROMIUM}, {CHROMEDRIVER} not found): {INSTALL}"
    if reason:
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1100,1400")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def axis_value(label: str) -> float:
    return float(label.replace("\u2212", "-"))  # matplotlib's minus sign


def test_the_page_opens_from_a_copied_folder_and_its_forest_plot_draws_each_interval(browser, tmp_path):
    cfg = load_config(finished_run(tmp_path / "made"))
    summary = report.write(cfg)
    copy = tmp_path / "copied" / "run"
    shutil.copytree(Path(cfg.run.dir), copy)
    shutil.rmtree(Path(cfg.run.dir))  # nothing of the original is left to be read
    browser.get((copy / report.REPORT_HTML).as_uri())
    assert browser.title == f"cocomix run {cfg.run.dir}"
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []

    differences = [
        d for against in summary["paired_with"].values() for rows in against.values() for d in rows.values()
    ]
    drawn = browser.execute_script(INTERVALS)
    assert [d["id"] for d in drawn] == [f"interval-{i}" for i in range(len(differences))]
    for found, difference in zip(drawn, differences, strict=True):
        (v0, x0), (v1, x1) = [(axis_value(label), x) for label, x in found["ticks"][:2]]
        scale = (x1 - x0) / (v1 - v0)
        low, high = ((x - x0) / scale + v0 for x in (found["left"], found["right"]))
        width = difference["ci95"][1] - difference["ci95"][0]
        # the line's round caps overhang each end by half its width: within 3% of the interval's width
        assert low == pytest.approx(difference["ci95"][0], abs=0.03 * width), found["id"]
        assert high == pytest.approx(difference["ci95"][1], abs=0.03 * width), found["id"]

    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] > 500 and pixels.std() > 0.05  # not blank
    assert json.loads((copy / report.SUMMARY).read_text()) == summary


def test_searching_the_concepts_hides_what_does_not_match_and_a_concept_page_shows_its_contexts(
    browser, tmp_path
):
    from selenium.webdriver.common.by import By

    cfg = load_config(finished_run(tmp_path))
    report.write(cfg)
    page = Path(cfg.run.dir) / report.REPORT_HTML
    browser.get(page.as_uri())

    def visible(concept: int) -> bool:
        return browser.find_element(By.ID, f"row-{concept}").is_displayed()

    assert visible(219) and visible(7)
    browser.find_element(By.ID, "concept-search").send_keys("crown")  # a word of concept 219's label
    assert visible(219) and not visible(7) and not visible(1500)
    browser.find_element(By.ID, "concept-search").clear()
    browser.find_element(By.ID, "concept-search").send_keys(" ")  # input event: empty search again
    assert visible(7)

    # A column header sorts: by id, ascending then descending.
    header = browser.find_element(By.CSS_SELECTOR, "#concept-table th[data-sort='number']")
    header.click()
    order = [
        row.get_attribute("id") for row in browser.find_elements(By.CSS_SELECTOR, "#concept-table tbody tr")
    ]
    assert order == ["row-1500", "row-219", "row-7"]
    header.click()
    order = [
        row.get_attribute("id") for row in browser.find_elements(By.CSS_SELECTOR, "#concept-table tbody tr")
    ]
    assert order == ["row-7", "row-219", "row-1500"]

    # The id opens the concept's page, hidden until then; its context shows the token marked.
    assert not browser.find_element(By.ID, "concept-219").is_displayed()
    browser.find_element(By.CSS_SELECTOR, "#row-219 a").click()
    concept = browser.find_element(By.ID, "concept-219")
    assert concept.is_displayed() and not browser.find_element(By.ID, "concept-7").is_displayed()
    mark = concept.find_element(By.CSS_SELECTOR, "ol.contexts mark")
    assert (
        mark.text.strip() == "king" and mark.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
    )
    assert "is dead <long live>" in concept.text
    # Its histogram is drawn, and its marks on the demo prompt where the student predicts it.
    bars = concept.find_element(By.CSS_SELECTOR, "figure.histogram path")
    assert bars.size["width"] > 50 and bars.size["height"] > 20
    assert [m.text for m in concept.find_elements(By.CSS_SELECTOR, "ul.predicted mark")] == [" lords", ","]
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
