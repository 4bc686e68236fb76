"""report.html: its content (the answer first, every figure embedded, nothing fetched), `attnprobe report DIR`, older
cells, and the page in a real headless browser (Debian's chromium; `make test` installs it where apt-get can)."""

import base64
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import attnprobe
from attnprobe.study.cells import read_cell, write_cell, Cell, Manifest
from attnprobe.study.cli import main
from attnprobe.study.page import rewrite_page

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    parent, here = tmp_path_factory.mktemp("report"), os.getcwd()
    os.chdir(parent)  # a relative out, as make study's out/study: the merge's page once lost every table to it
    try:
        attnprobe.study(model="tiny", out="study", concepts=["dog"], seeds=[0, 1], steps=2, progress=False,
                        echo=False, scorer="none")  # no presence: the page needs none, and the CLIP scorer costs seconds
    finally:
        os.chdir(here)
    return parent / "study"


def test_the_page_leads_with_the_answer_and_embeds_every_figure(folder):
    page = (folder / "report.html").read_text()
    answer, tables, browser = page.index("id=answer"), page.index("id=tables"), page.index("id=browser")
    assert answer < page.index("instruction − repetition") < tables < browser
    assert page.index("does each row lower attention beyond its reference?") < tables  # report.answer_lines
    for png in sorted(folder.glob("*.png")):
        assert base64.b64encode(png.read_bytes()).decode() in page, png.name
    assert not re.search(r"https?://", page)  # nothing fetched: no server, no network
    assert "<script src" not in page and "<link" not in page
    data = json.loads(re.search(r"const DATA = (.*?);\n", page).group(1))
    cells = data["cells"]
    assert [(c["concept"], c["seed"]) for c in cells] == [("dog", 0), ("dog", 1)]
    row = cells[0]["rows"][0]
    assert row["image"].startswith("data:image/png;base64,")
    assert row["sites"]["shape"][0] == len(cells[0]["sites"]) > 1
    assert row["calls"]["shape"][0] == len(cells[0]["timesteps"]) == 2
    assert max(row["sites"]["shape"][1:]) <= 32
    assert row["joint"]["shape"][0] == len(cells[0]["sites"]) * 2 and max(row["joint"]["shape"][1:]) <= 12


def test_cells_keep_the_browser_maps(folder):
    entry = next(iter(Manifest(folder).entries().values()))[0]
    record, tensors = read_cell(folder, entry)
    sites, calls = tensors["sitemaps.0"].float(), tensors["callmaps.0"].float()
    assert sites.shape[0] == len(record["map_sites"]) and calls.shape[0] == 2
    # the mean over sites and the mean over calls are the same map (the heat map at this size)
    assert (sites.mean(0) - calls.mean(0)).abs().max() <= 1e-3 * sites.abs().max()
    assert tensors["sitecalls.0"].shape[:2] == (sites.shape[0], 2)  # every site at every call


def test_report_command_rewrites_only_the_page(folder, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "report.html"}
    page = (folder / "report.html").read_bytes()
    (folder / "report.html").unlink()
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.html").read_bytes() == page  # the merge's page, from the cells and tables
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "report.html"} == before
    assert "report.html" in capsys.readouterr().out


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_report_command_refuses_what_is_not_a_study(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("hi")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("attnprobe: error:") and str(target) in err


def test_cells_of_older_runs_show_their_image_and_mean_map(folder, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    manifest = Manifest(old)
    for cell_id, entries in manifest.entries().items():
        record, tensors = read_cell(old, entries[0])
        if "map_sites" not in record:  # the text cells
            continue
        record.pop("map_sites")
        kept = {k: v for k, v in tensors.items() if not k.startswith(("sitemaps.", "callmaps.", "sitecalls."))}
        cell = Cell(**record["cell"])
        manifest.record(cell, write_cell(old, cell, record, kept, settings=entries[0]["settings"]))
    rewrite_page(old)
    cells = json.loads(re.search(r"const DATA = (.*?);\n", (old / "report.html").read_text()).group(1))["cells"]
    assert len(cells) == 2 and cells[0]["sites"] == [] and "mean" in cells[0]["rows"][0]
    assert "sites" not in cells[0]["rows"][0] and cells[0]["rows"][0]["image"]


# --- in a real browser ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromedriver are not installed (/usr/bin/chromium, /usr/bin/chromedriver): "
                    "`make test` installs them with apt-get (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # no Selenium Manager download
    yield driver
    driver.quit()


def _shown(driver, after: str | None = None):
    """The canvas once drawn (after the draw numbered ``after``): its draw number, pixels (PNG data URL), caption."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        drawn = driver.execute_script("return document.getElementById('hm').dataset.drawn || null")
        if drawn is not None and drawn != after:
            return drawn, driver.execute_script("return document.getElementById('hm').toDataURL()"), \
                driver.find_element("id", "info").text
        time.sleep(0.05)
    raise AssertionError("the heat map was not drawn within 10 s")


def test_the_page_in_a_headless_browser(folder, browser):
    from PIL import Image
    from selenium.webdriver.support.ui import Select

    browser.get((folder / "report.html").as_uri())
    drawn, pixels, info = _shown(browser)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    assert len(set(shot.getdata())) > 50  # not blank: text, tables, colours
    assert "The answer" in browser.find_element("id", "answer").text
    assert "dog, baseline, seed 0: all sites, all calls" in info
    for control, value in (("site", "1"), ("call", "1"), ("v", "instruction"), ("s", "1")):
        Select(browser.find_element("id", control)).select_by_value(value)
        drawn, after, info = _shown(browser, drawn)
        assert after != pixels, f"choosing {control}={value} left the map as it was"
        pixels = after
    assert "dog, instruction, seed 1: site " in info and ", call 1;" in info  # one site at one call
    Select(browser.find_element("id", "site")).select_by_value("all")
    drawn, after, info = _shown(browser, drawn)
    assert after != pixels and "dog, instruction, seed 1: call 1, mean over sites" in info
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    assert len(set(shot.getdata())) > 50
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_past_its_budget_the_page_keeps_no_site_at_one_call(folder, monkeypatch):
    """The site × call maps stop at JOINT_BUDGET values per page; the marginals stay (the browser says why)."""
    from attnprobe.study import page

    before = json.loads(re.search(r"const DATA = (.*?);\n", (folder / "report.html").read_text()).group(1))
    assert all(r.get("joint") for c in before["cells"] for r in c["rows"])
    monkeypatch.setattr(page, "JOINT_BUDGET", 1)
    rewrite_page(folder)
    html_text = (folder / "report.html").read_text()
    after = json.loads(re.search(r"const DATA = (.*?);\n", html_text).group(1))
    assert all(r.get("joint") is None and r["sites"] and r["calls"] for c in after["cells"] for r in c["rows"])
    assert "the page's budget for one-site-one-call maps is spent" in html_text
    monkeypatch.undo()
    rewrite_page(folder)
