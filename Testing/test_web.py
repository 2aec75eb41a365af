"""`medsam2 web` end to end in a real browser: Debian's Chromium driven by Playwright, against the
command started as a user starts it (random-weight checkpoint, 256 px, CPU), on 15 slices of
slicerio's chest CT.

What is checked is what a user relies on: a click lands on the voxel under the mouse (the server's
status endpoint reports the prompt as the engine received it, in IJK), the segment changes on that
slice only, and the page shows the segment's colour where its voxels project into the view and
nowhere else (the projection is computed here from the view's XY-to-RAS matrix and the segment's
voxels, not by VTK). One server serves the whole module; each test starts from its own segments.
"""

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="the web extra is not installed (pip install -e '.[web]')")
playwright_api = pytest.importorskip("playwright.sync_api")

from MedSAM2Web import testing as web  # noqa: E402

TOKEN = "web-test-token-5f1c"
FIRST_SLICE, SLICES = 10, 15           # CTChest4 slices 10..24: an odd count has one middle slice
MIDDLE = SLICES // 2
GREEN, MAGENTA = "#00ff00", "#ff00ff"  # vivid: easy to tell from grey CT through JPEG
VIEWPORT = {"width": 1280, "height": 800}
INSIDE_MIN, OUTSIDE_MAX = 0.97, 0.01
UPLOAD_MB = 2  # the 15-slice crop is 0.5 MB


@pytest.fixture(scope="module")
def site(tmp_path_factory, random_checkpoint, ct_path):
    folder = tmp_path_factory.mktemp("web")
    volume, token_file = web.site_files(folder, ct_path, FIRST_SLICE, SLICES, TOKEN)
    # --output relative to the folder the server runs in: the page (and the README's screenshot) shows
    # "chest.seg.nrrd", not the test's temporary folder
    output = folder / "chest.seg.nrrd"
    server = web.WebServer([volume, "--model", "sam2.1_hiera_tiny", "--checkpoint", random_checkpoint,
                            "--device", "cpu", "--image-size", "256", "--output", output.name,
                            "--page-token-file", token_file, "--max-upload-mb", UPLOAD_MB], log_dir=folder)
    server.start()
    try:
        yield {"server": server, "url": server.url, "output": output, "volume": volume}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = web.launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(site, browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    web.login(page, site["url"], TOKEN)
    wait_view_sized(page, site["url"])
    yield page
    context.close()


@pytest.fixture(scope="module")
def right_lung_voxel(ct_segmentation_path):
    """A voxel deep inside the right lung on the middle slice (ground truth shipped with slicerio)."""
    import slicerio
    from scipy import ndimage

    seg = slicerio.read_segmentation(str(ct_segmentation_path))
    entry = next(s for s in seg["segments"] if s["name"] == "right lung")
    voxels = seg["voxels"][..., entry.get("layer", 0)] if seg["voxels"].ndim == 4 else seg["voxels"]
    lung = voxels[:, :, FIRST_SLICE + MIDDLE] == entry["labelValue"]  # (i, j)
    depth = ndimage.distance_transform_edt(lung)
    i, j = np.unravel_index(np.argmax(depth), depth.shape)
    assert depth[i, j] >= 5, "the right lung should be several voxels deep on this slice"
    return (int(i), int(j), MIDDLE)


# --- helpers ---------------------------------------------------------------------------------
def red(page):
    return page.locator('[data-view="Red"]')


def wait_view_sized(page, url, view="Red"):
    """Until the server's view has the size the page gives it (the page reports it once shown)."""
    element = page.locator(f'[data-view="{view}"]')
    element.wait_for(timeout=60_000)

    def sized():
        views = web.status(page, url)["views"]
        return view in views and views[view]["size"] == web.view_size_on_page(element)

    web.wait_until(sized, 30, what=f"the {view} view to take its size on the page")


def button(page, name):
    return page.get_by_role("button", name=name, exact=True)


def fresh_segment(page, url, color):
    """Delete every segment, add one and colour it, all through the page; returns its ID."""
    for segment in web.status(page, url)["segments"]:
        button(page, f"Delete {segment['name']}").click()
    web.wait_until(lambda: not web.status(page, url)["segments"], 10, what="the segments to go")
    button(page, "Add segment").click()
    new = web.wait_until(lambda: web.status(page, url)["segments"], 10, what="a new segment")[0]
    page.get_by_label(f"Colour of {new['name']}").fill(color)
    web.wait_until(lambda: web.status(page, url)["segments"][0]["color"] == color, 10, what="the colour")
    return new["id"]


def choose_tool(page, name):
    tool = button(page, name)
    if tool.get_attribute("aria-pressed") != "true":
        tool.click()
    web.wait_until(lambda: tool.get_attribute("aria-pressed") == "true", 5, what=f"{name} to be active")


def show_slice(page, url, k):
    """Scroll the Red view with the mouse wheel (one slice a notch) until it shows slice k."""
    red(page).hover()
    for _ in range(2 * SLICES):
        shown = round(red_slice(web.status(page, url)))
        if shown == k:
            return
        page.mouse.wheel(0, -100 if k > shown else 100)  # wheel up: towards higher slices
        web.wait_until(lambda: round(red_slice(web.status(page, url))) != shown, 10, what="the wheel to move a slice")
    pytest.fail(f"the mouse wheel did not bring the Red view to slice {k}")


def click_voxel(page, url, ijk):
    """Show the voxel's slice, click the voxel's centre with the active tool; the status after the prompt."""
    show_slice(page, url, round(ijk[2]))
    before = prompt_number(page, url)
    x, y = web.ijk_to_view_point(web.status(page, url), ijk)
    red(page).click(position={"x": x, "y": y})
    return wait_prompt(page, url, before)


def filled_slices(page, url, segment_id):
    return {int(k) for k in segment(web.status(page, url), segment_id)["voxels_per_slice"]}


def prompt_number(page, url):
    prompt = web.status(page, url)["last_prompt"]
    return prompt["number"] if prompt else 0


def wait_prompt(page, url, after):
    """The status once the engine has taken the prompt numbered after+1 and finished."""
    def taken():
        state = web.wait_idle(page, url)
        if state["error"]:
            pytest.fail(f"the page shows an error: {state['error']}")
        return state if state["last_prompt"] and state["last_prompt"]["number"] > after else None

    return web.wait_until(taken, 120, interval=0.2, what=f"prompt {after + 1}")


def segment(state, segment_id):
    return next(s for s in state["segments"] if s["id"] == segment_id)


def assert_overlay(page, url, segment_id, timeout=30.0):
    """The Red view shows the segment's colour where its voxels project, and nowhere else.

    The page may still show an older frame (views stream asynchronously), so this retries until
    the screenshot agrees or the time is up, then reports the last comparison."""
    last = {}

    def agrees():
        check = web.overlay_check(web.status(page, url, masks=True), segment_id)
        image = web.screenshot_rgb(red(page))
        last.update(check.agreement(image))
        return check.matches(image, INSIDE_MIN, OUTSIDE_MAX)  # an empty slice: colour nowhere

    try:
        web.wait_until(agrees, timeout, interval=0.3, what="the overlay")
    except TimeoutError:
        pytest.fail(f"the Red view's colour does not match the segment: {last}")
    return last


def red_slice(state):
    """The volume slice (k) the Red view shows."""
    ras_to_ijk = np.linalg.inv(np.asarray(state["volume"]["ijk_to_ras"]))
    return float((ras_to_ijk @ np.append(state["views"]["Red"]["center"], 1.0))[2])


# --- tests -----------------------------------------------------------------------------------
def test_without_the_token_the_page_is_a_login_prompt_and_no_image_data_arrives(site, browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    sockets, images = [], []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.on("response", lambda r: images.append(r.url) if r.headers.get("content-type", "").startswith("image/") else None)
    try:
        page.goto(site["url"])
        assert page.get_by_label("Access token").is_visible()
        page.get_by_label("Access token").fill("not-" + TOKEN)
        page.get_by_role("button", name="Log in").click()
        page.get_by_text("Wrong token.").wait_for()
        page.wait_for_timeout(1500)  # time enough for a page that would start streaming
        assert page.locator("[data-view]").count() == 0
        assert sockets == [] and images == []
        # nothing else answers either: the view stream's websocket, the status, the download
        for path in ("ws", "medsam2/status", "medsam2/download", "index.html"):
            assert page.request.get(site["url"] + path).status == 401, path
        # another web site cannot use the user's browser against the page, nor can a DNS name rebound to 127.0.0.1
        assert page.request.get(site["url"] + "medsam2/status", headers={"Origin": "http://evil.example"}).status == 403
        port = site["url"].rstrip("/").rsplit(":", 1)[1]
        assert page.request.get(site["url"], headers={"Host": f"evil.example:{port}"}).status == 403
        # the same browser with the right token gets the views (the gate is not simply closed)
        web.login(page, site["url"], TOKEN)
        page.locator('[data-view="Red"]').wait_for(timeout=60_000)
        web.wait_until(lambda: sockets, 30, what="the view stream")
    finally:
        context.close()


def test_the_page_opens_on_the_middle_axial_slice_centred_in_the_view(site, page):
    state = web.status(page, site["url"])
    assert state["volume"]["dims"] == [128, 128, SLICES]
    assert abs(red_slice(state) - MIDDLE) < 1e-3
    # fitted as Slicer fits: the volume's centre at the view's centre
    w, h = state["views"]["Red"]["size"]
    x, y = web.ijk_to_view_point(state, [(n - 1) / 2 for n in state["volume"]["dims"]])
    assert abs(x - w / 2) <= 1.0 and abs(y - h / 2) <= 1.0
    # and the whole volume fits: its corners are inside the view
    for corner in ((0, 0, MIDDLE), (127, 127, MIDDLE)):
        cx, cy = web.ijk_to_view_point(state, corner)
        assert 0 <= cx <= w and 0 <= cy <= h


def test_an_include_click_reaches_the_engine_at_the_clicked_voxel_and_shows_where_the_segment_is(
        site, page, right_lung_voxel):
    url = site["url"]
    segment_id = fresh_segment(page, url, GREEN)
    choose_tool(page, "Include point")
    state = click_voxel(page, url, right_lung_voxel)
    prompt = state["last_prompt"]
    assert prompt["kind"] == "include point" and prompt["segment"] == segment_id
    (point,) = prompt["points"]
    assert point["label"] == 1
    assert np.max(np.abs(np.asarray(point["ijk"]) - right_lung_voxel)) <= 1.0, (point, right_lung_voxel)
    # the segment changed on the clicked slice only
    assert prompt["changed_frames"] == [MIDDLE]
    assert list(segment(state, segment_id)["voxels_per_slice"]) == [str(MIDDLE)]
    assert_overlay(page, url, segment_id)


def test_propagate_scroll_undo_redo(site, page, right_lung_voxel):
    url = site["url"]
    segment_id = fresh_segment(page, url, GREEN)
    choose_tool(page, "Include point")
    click_voxel(page, url, right_lung_voxel)
    button(page, "Propagate").click()
    page.get_by_role("progressbar", name="Progress").wait_for(timeout=30_000)
    state = web.wait_idle(page, url, timeout=300)
    assert state["error"] == ""
    filled = {int(k) for k in segment(state, segment_id)["voxels_per_slice"]}
    assert len(filled) > SLICES // 2, filled

    # scroll the Red view two slices up with the mouse wheel: the overlay there is the segment's
    shown = MIDDLE + 2
    assert shown in filled
    show_slice(page, url, shown)
    assert_overlay(page, url, segment_id)

    button(page, "Undo").click()  # undoes the propagation: this slice is empty again
    web.wait_until(lambda: filled_slices(page, url, segment_id) == {MIDDLE}, 10, what="the undo")
    assert_overlay(page, url, segment_id)  # no colour at all on this slice
    button(page, "Redo").click()
    web.wait_until(lambda: filled_slices(page, url, segment_id) == filled, 10, what="the redo")
    assert_overlay(page, url, segment_id)
    web.keep_page_screenshot(page, "web-page-after-click-and-propagation.jpg")  # README's, when asked


def test_box_exclude_point_and_a_second_segment_in_its_own_colour(site, page, right_lung_voxel):
    url = site["url"]
    first = fresh_segment(page, url, GREEN)
    page.keyboard.press("i")  # the Slicer module's shortcuts: I include, X exclude, O box
    web.wait_until(lambda: button(page, "Include point").get_attribute("aria-pressed") == "true", 5, what="I")
    click_voxel(page, url, right_lung_voxel)

    button(page, "Add segment").click()
    second = web.wait_until(lambda: [s for s in web.status(page, url)["segments"] if s["id"] != first], 10)[0]
    page.get_by_label(f"Colour of {second['name']}").fill(MAGENTA)
    web.wait_until(lambda: segment(web.status(page, url), second["id"])["color"] == MAGENTA, 10)
    # the second segment works on the slice below, so each slice shows one segment
    show_slice(page, url, MIDDLE - 1)
    state = web.status(page, url)
    i, j, _ = right_lung_voxel
    corner_a, corner_b = (i - 8, j - 8, MIDDLE - 1), (i + 8, j + 8, MIDDLE - 1)
    page.keyboard.press("o")
    web.wait_until(lambda: button(page, "Box").get_attribute("aria-pressed") == "true", 5, what="O")
    (xa, ya), (xb, yb) = (web.ijk_to_view_point(state, c) for c in (corner_a, corner_b))
    origin = red(page).bounding_box()
    before = prompt_number(page, url)
    page.mouse.move(origin["x"] + xa, origin["y"] + ya)
    page.mouse.down()
    for t in np.linspace(0.2, 1.0, 5):  # drag: the rubber band follows
        page.mouse.move(origin["x"] + xa + t * (xb - xa), origin["y"] + ya + t * (yb - ya))
    page.mouse.up()
    state = wait_prompt(page, url, before)
    prompt = state["last_prompt"]
    assert prompt["kind"] == "box" and prompt["segment"] == second["id"]
    got = np.sort(np.asarray(prompt["box"]), axis=0)
    want = np.sort(np.asarray([corner_a, corner_b], float), axis=0)
    assert np.max(np.abs(got - want)) <= 1.0, (got, want)
    assert list(segment(state, second["id"])["voxels_per_slice"]) == [str(MIDDLE - 1)]

    page.keyboard.press("x")
    web.wait_until(lambda: button(page, "Exclude point").get_attribute("aria-pressed") == "true", 5, what="X")
    state = click_voxel(page, url, (i, j, MIDDLE - 1))
    prompt = state["last_prompt"]
    assert prompt["kind"] == "exclude point" and prompt["points"][0]["label"] == 0
    assert np.max(np.abs(np.asarray(prompt["points"][0]["ijk"]) - (i, j, MIDDLE - 1))) <= 1.0
    assert_overlay(page, url, second["id"])  # magenta where the second segment is, on its slice

    page.keyboard.press("Escape")
    show_slice(page, url, MIDDLE)  # back up: the first segment, green, and no magenta
    assert_overlay(page, url, first)
    assert_overlay(page, url, second["id"])

    # names travel with the segments into the saved file
    name = page.get_by_label(f"Name of {second['name']}")
    name.fill("lesion")
    name.press("Enter")
    web.wait_until(lambda: segment(web.status(page, url), second["id"])["name"] == "lesion", 10, what="the name")


def test_save_writes_a_segmentation_slicer_reads_with_names_colours_and_geometry(site, page):
    import nrrd
    import slicerio

    url = site["url"]
    state = web.status(page, url, masks=True)
    assert len(state["segments"]) == 2, "runs after the two-segment test"
    button(page, "Save").click()
    web.wait_until(lambda: web.status(page, url)["saved"], 30, what="the save")
    seg = slicerio.read_segmentation(str(site["output"]))
    volume_header = nrrd.read_header(str(site["volume"]))
    assert np.allclose(seg["ijkToLPS"][:3, :3], volume_header["space directions"])
    assert np.allclose(seg["ijkToLPS"][:3, 3], volume_header["space origin"])
    assert seg["voxels"].shape[:3] == tuple(volume_header["sizes"])
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {state["segments"][0]["name"], "lesion"}
    for row in state["segments"]:
        saved = by_name[row["name"]]
        assert np.allclose(saved["color"], [int(row["color"][k:k + 2], 16) / 255 for k in (1, 3, 5)], atol=1e-3)
        voxels = seg["voxels"][..., saved.get("layer", 0)] if seg["voxels"].ndim == 4 else seg["voxels"]
        np.testing.assert_array_equal((voxels == saved["labelValue"]).transpose(2, 1, 0), web.segment_mask(row))
    # and the page offers it for download
    with page.expect_download() as download:
        page.get_by_role("link", name=f"Download {Path(site['output']).name}").click()
    assert Path(download.value.path()).read_bytes() == Path(site["output"]).read_bytes()


def test_cancel_stops_a_propagation_and_keeps_the_finished_slices(site, page, right_lung_voxel):
    url = site["url"]
    segment_id = fresh_segment(page, url, GREEN)
    choose_tool(page, "Include point")
    click_voxel(page, url, right_lung_voxel)
    page.keyboard.press("Shift+P")
    cancel = button(page, "Cancel")
    cancel.wait_for(timeout=30_000)
    web.wait_until(lambda: len(filled_slices(page, url, segment_id)) >= 2, 60, what="a propagated slice")
    cancel.click()
    state = web.wait_idle(page, url)
    done = {int(k) for k in segment(state, segment_id)["voxels_per_slice"]}
    assert MIDDLE in done and 1 < len(done) < SLICES, done
    assert "Cancelled" in state["message"]
    page.get_by_role("status").filter(has_text="Cancelled after").wait_for(timeout=10_000)  # the page says so
    time.sleep(0.5)
    assert web.status(page, url)["can_undo"]


def test_a_click_outside_the_volume_is_explained_on_the_page(site, page):
    url = site["url"]
    fresh_segment(page, url, GREEN)
    choose_tool(page, "Include point")
    show_slice(page, url, MIDDLE)
    state = web.status(page, url)
    left_edge = min(web.ijk_to_view_point(state, (i, 64, MIDDLE))[0] for i in (-0.5, 127.5))
    assert left_edge > 40, "the view is wider than the image: there is a margin to click in"
    left_of_image, y = left_edge / 2, state["views"]["Red"]["size"][1] / 2
    red(page).click(position={"x": left_of_image, "y": y})
    alert = page.get_by_role("alert").filter(has_text="outside")
    alert.wait_for(timeout=30_000)
    assert "outside" in alert.inner_text() and "Place it on the volume's image" in alert.inner_text()
    assert not web.wait_idle(page, url)["segments"][0]["voxels_per_slice"]
    alert.get_by_role("button", name="Close").click()  # the user reads it and closes it
    web.wait_until(lambda: web.status(page, url)["error"] == "", 10, what="the alert to close")
    assert page.get_by_role("alert").count() == 0


def test_the_three_view_layout_and_a_click_in_the_coronal_view(site, page, right_lung_voxel):
    url = site["url"]
    segment_id = fresh_segment(page, url, GREEN)
    choose_tool(page, "Include point")
    page.get_by_label("Layout").click(force=True)  # the shown value covers the field
    page.get_by_role("option", name="Three over one").click()
    green = page.locator('[data-view="Green"]')
    wait_view_sized(page, url, "Green")
    state = web.status(page, url)
    ras_to_ijk = np.linalg.inv(np.asarray(state["volume"]["ijk_to_ras"]))
    j = round((ras_to_ijk @ np.append(state["views"]["Green"]["center"], 1.0))[1])  # the coronal slice shown
    target = (right_lung_voxel[0], j, MIDDLE)
    before = prompt_number(page, url)
    x, y = web.ijk_to_view_point(state, target, view="Green")
    green.click(position={"x": x, "y": y})
    state = wait_prompt(page, url, before)
    prompt = state["last_prompt"]
    assert prompt["axis"] == 1 and prompt["segment"] == segment_id  # frames along J: coronal
    assert np.max(np.abs(np.asarray(prompt["points"][0]["ijk"]) - target)) <= 1.0
    state = web.status(page, url, masks=True)
    check = web.overlay_check(state, segment_id, view="Green")
    web.wait_until(lambda: check.matches(web.screenshot_rgb(green), INSIDE_MIN, OUTSIDE_MAX), 30,
                   interval=0.3, what="the overlay in the coronal view")
    page.get_by_label("Layout").click(force=True)
    page.get_by_role("option", name="Red slice only").click()
    wait_view_sized(page, url)


def test_opening_a_volume_from_the_page_replaces_the_scene(site, page, ct_path, tmp_path):
    import SimpleITK as sitk

    url = site["url"]
    other = tmp_path / "upper.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ct_path))[:, :, 20:29], str(other))
    big = tmp_path / "big.nrrd"
    big.write_bytes(b"0" * (UPLOAD_MB + 1) * 1024 * 1024)
    page.set_input_files("#medsam2-open", str(big))
    page.get_by_role("alert").filter(has_text="upload limit").wait_for(timeout=30_000)
    assert web.status(page, url)["volume"]["name"] == "chest"  # refused: nothing changed
    page.set_input_files("#medsam2-open", str(other))
    state = web.wait_until(lambda: (s := web.status(page, url))["volume"]["name"] == "upper" and s, 60,
                           what="the opened volume")
    assert state["volume"]["dims"] == [128, 128, 9]
    assert [s["voxels_per_slice"] for s in state["segments"]] == [{}]  # one new, empty segment
    page.get_by_text("MedSAM2 - upper").wait_for(timeout=10_000)  # the page title follows the server state
    assert abs(red_slice(state) - 4) < 1e-3  # its middle slice
