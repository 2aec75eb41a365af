"""`medsam2 web` as a new user meets it (issue 20), in Debian's Chromium driven by Playwright.

A fresh server of its own (its first state is what is checked), started with `--random-weights`
as an offline user would: the first click after a volume opens is a prompt, a click with no tool
says what to do, a propagation says what it did, the slice number stands beside the slider and
the arrow and Page keys move the slice, the start prints no VTK warnings.
"""

import re

import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="the web extra is not installed (bash scripts/install.sh)")
playwright_api = pytest.importorskip("playwright.sync_api")

from MedSAM2Web import testing as web  # noqa: E402

TOKEN = "first-use-token-8e21"
FIRST_SLICE, SLICES = 10, 15
MIDDLE = SLICES // 2
VIEWPORT = {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def site(tmp_path_factory, ct_path):
    folder = tmp_path_factory.mktemp("web-first-use")
    volume, token_file = web.site_files(folder, ct_path, FIRST_SLICE, SLICES, TOKEN)
    # as the README says it, offline: --random-weights, and --output relative to where it runs
    server = web.WebServer([volume, "--model", "sam2.1_hiera_tiny", "--random-weights", "--device", "cpu",
                            "--image-size", "256", "--output", "chest.seg.nrrd", "--page-token-file", token_file],
                           log_dir=folder)
    server.start()
    try:
        yield {"server": server, "url": server.url, "folder": folder}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(site):
    with playwright_api.sync_playwright() as p:
        browser = web.launch_chromium(p)
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        web.login(page, site["url"], TOKEN)
        page.locator('[data-view="Red"]').wait_for(timeout=60_000)
        yield page
        browser.close()


def red(page):
    return page.locator('[data-view="Red"]')


def red_slice(state) -> float:
    ras_to_ijk = np.linalg.inv(np.asarray(state["volume"]["ijk_to_ras"]))
    return float((ras_to_ijk @ np.append(state["views"]["Red"]["center"], 1.0))[2])


def wait_view_sized(page, url):
    def sized():
        views = web.status(page, url)["views"]
        return "Red" in views and views["Red"]["size"] == web.view_size_on_page(red(page))

    web.wait_until(sized, 30, what="the Red view to take its size on the page")


def click_voxel(page, url, ijk):
    before = (web.status(page, url)["last_prompt"] or {}).get("number", 0)
    x, y = web.ijk_to_view_point(web.status(page, url), ijk)
    red(page).click(position={"x": x, "y": y})
    return web.wait_until(lambda: (s := web.wait_idle(page, url))["last_prompt"]
                          and s["last_prompt"]["number"] > before and s, 120, interval=0.2, what="the prompt")


def slice_label(page):
    return page.get_by_label("Red slice number")


def test_the_start_prints_no_vtk_warnings_and_says_random_weights(site, page):
    log = site["server"].log()
    assert "vtkXRenderWindowInteractor" not in log and "WindowResizeEvent" not in log, log[-2000:]
    assert "RANDOM WEIGHTS" in log  # --random-weights: the banner, as every verb prints it
    page.get_by_text("RANDOM WEIGHTS: masks are meaningless").wait_for(timeout=10_000)


def test_a_volume_opens_with_include_point_active_and_the_first_click_is_a_prompt(site, page):
    url = site["url"]
    wait_view_sized(page, url)
    assert web.status(page, url)["tool"] == "include"
    include = page.get_by_role("button", name="Include point", exact=True)
    assert include.get_attribute("aria-pressed") == "true"
    state = click_voxel(page, url, (40, 64, MIDDLE))  # the first click, no tool chosen by hand
    assert state["last_prompt"]["kind"] == "include point" and state["error"] == ""
    assert list(state["segments"][0]["voxels_per_slice"]) == [str(MIDDLE)]


def test_the_save_line_names_the_output_as_given(site, page):
    line = page.get_by_label("Output file")
    assert line.inner_text().strip() == "Save writes chest.seg.nrrd"  # not the folder it happens to run in
    assert web.status(page, site["url"])["output"] == str(site["folder"] / "chest.seg.nrrd")


def test_after_a_propagation_the_page_says_what_it_did_and_keys_move_the_slice(site, page):
    url = site["url"]
    assert slice_label(page).inner_text() == f"Slice {MIDDLE} / {SLICES}"
    page.keyboard.press("Shift+P")
    state = web.wait_until(lambda: (s := web.wait_idle(page, url, timeout=300))["message"] and s, 30,
                           what="the propagation's report")
    filled = len(state["segments"][0]["voxels_per_slice"])
    found = re.fullmatch(r"Propagated (\d+) slices in (\d+\.\d s|\d+ s|\d+ min \d+ s)\.", state["message"])
    assert found and int(found.group(1)) == filled, (state["message"], filled)
    page.get_by_role("status").filter(has_text="Propagated").wait_for(timeout=10_000)  # the page says it

    red(page).hover()
    for key, want in (("ArrowUp", MIDDLE + 1), ("PageUp", MIDDLE + 2), ("PageDown", MIDDLE + 1),
                      ("ArrowDown", MIDDLE), ("ArrowLeft", MIDDLE - 1), ("ArrowRight", MIDDLE)):
        page.keyboard.press(key)
        web.wait_until(lambda: abs(red_slice(web.status(page, url)) - want) < 1e-3, 10, what=f"{key} -> {want}")
        web.wait_until(lambda: slice_label(page).inner_text() == f"Slice {want} / {SLICES}", 10,
                       what=f"the label after {key}")


def test_shift_e_uses_the_slice_as_it_is(site, page):
    url = site["url"]
    before = web.status(page, url)["last_prompt"]["number"]
    page.keyboard.press("Shift+E")  # Slicer's "use edited slice", from the one shortcut table
    state = web.wait_until(lambda: (s := web.wait_idle(page, url))["last_prompt"]["number"] > before and s, 60,
                           what="the edited slice as a prompt")
    assert state["last_prompt"]["frame"] == round(red_slice(state)) and state["error"] == ""


def test_a_click_with_no_tool_says_what_to_do(site, page):
    url = site["url"]
    page.keyboard.press("Escape")
    web.wait_until(lambda: web.status(page, url)["tool"] is None, 10, what="no tool")
    number = web.status(page, url)["last_prompt"]["number"]
    w, h = web.status(page, url)["views"]["Red"]["size"]
    red(page).click(position={"x": w / 2, "y": h / 2})
    page.get_by_role("status").filter(has_text="No prompt tool is active").wait_for(timeout=10_000)
    assert "Include point (I)" in web.status(page, url)["message"]
    assert web.wait_idle(page, url)["last_prompt"]["number"] == number  # and nothing was sent


def test_a_box_dragged_as_a_line_is_refused_on_the_page(site, page):
    url = site["url"]
    page.keyboard.press("o")
    web.wait_until(lambda: web.status(page, url)["tool"] == "box", 10, what="the box tool")
    number = web.status(page, url)["last_prompt"]["number"]
    state = web.status(page, url)
    k = round(red_slice(state))
    (xa, ya), (xb, _) = (web.ijk_to_view_point(state, c) for c in ((30, 64, k), (90, 64, k)))
    origin = red(page).bounding_box()
    page.mouse.move(origin["x"] + xa, origin["y"] + ya)
    page.mouse.down()
    page.mouse.move(origin["x"] + (xa + xb) / 2, origin["y"] + ya)
    page.mouse.move(origin["x"] + xb, origin["y"] + ya)  # straight across: no height
    page.mouse.up()
    page.get_by_role("alert").filter(has_text="narrower or lower than a voxel").wait_for(timeout=10_000)
    assert web.wait_idle(page, url)["last_prompt"]["number"] == number  # nothing reached the engine
