"""The web page's correction loop in a real browser (Chromium via Playwright, `medsam2 web` started as
a user starts it): prompt markers drawn where they were placed, on their slice only, following undo
and redo; the review strip and "Next uncertain slice" after a propagation. Fixtures and helpers are
test_web.py's (its own server for this module)."""

import numpy as np

from MedSAM2Web import testing as web
from test_web import (MIDDLE, SLICES, browser, button, choose_tool, click_voxel, fresh_segment, page,  # noqa: F401
                      prompt_number, red, red_slice, right_lung_voxel, show_slice, site, wait_prompt)

from MedSAM2Lib.prompt_nodes import EXCLUDE_COLOR, INCLUDE_COLOR

BLUE = "#0000ff"  # the segment's colour: neither marker colour
BOX_COLOR = (1.0, 0.5, 0.5)  # a markups ROI's default (selected) colour: the box outline
MARKER_RADIUS_PX = 14  # a marker glyph is drawn within this distance of the click
MIN_MARKER_PX = 6


def _hex(rgb):
    return "#" + "".join(f"{round(255 * v):02x}" for v in rgb)


def marker_pixels(page, url, ijk, rgb) -> int:
    """Pixels in the marker's colour within MARKER_RADIUS_PX of where the voxel shows in the Red view."""
    x, y = web.ijk_to_view_point(web.status(page, url), ijk)
    image = web.screenshot_rgb(red(page))
    rows, cols = np.mgrid[:image.shape[0], :image.shape[1]]
    near = (cols - x) ** 2 + (rows - y) ** 2 <= MARKER_RADIUS_PX ** 2
    return int((web.tinted(image, _hex(rgb)) & near).sum())


def shows(page, url, ijk, rgb, present=True, what="a marker"):
    web.wait_until(lambda: (marker_pixels(page, url, ijk, rgb) >= MIN_MARKER_PX) == present, 20, interval=0.3,
                   what=f"{what} to {'appear' if present else 'vanish'}")


def test_prompt_markers_show_where_placed_on_their_slice_and_follow_undo(site, page, right_lung_voxel):
    url = site["url"]
    fresh_segment(page, url, BLUE)
    i, j, k = right_lung_voxel
    include, exclude = (i, j, k), (i + 12, j + 6, k)
    show_slice(page, url, k)
    assert marker_pixels(page, url, include, INCLUDE_COLOR) < MIN_MARKER_PX  # nothing there before
    assert marker_pixels(page, url, exclude, EXCLUDE_COLOR) < MIN_MARKER_PX
    choose_tool(page, "Include point")
    click_voxel(page, url, include)
    shows(page, url, include, INCLUDE_COLOR, what="the include marker")
    choose_tool(page, "Exclude point")
    click_voxel(page, url, exclude)
    shows(page, url, exclude, EXCLUDE_COLOR, what="the exclude marker")

    show_slice(page, url, k + 1)  # on their slice only
    shows(page, url, include, INCLUDE_COLOR, present=False, what="the include marker on the next slice")
    assert marker_pixels(page, url, exclude, EXCLUDE_COLOR) < MIN_MARKER_PX
    show_slice(page, url, k)
    shows(page, url, include, INCLUDE_COLOR)

    button(page, "Undo").click()  # the exclude point leaves the engine and the view
    shows(page, url, exclude, EXCLUDE_COLOR, present=False, what="the undone exclude marker")
    assert marker_pixels(page, url, include, INCLUDE_COLOR) >= MIN_MARKER_PX
    button(page, "Undo").click()
    shows(page, url, include, INCLUDE_COLOR, present=False, what="the undone include marker")
    button(page, "Redo").click()
    shows(page, url, include, INCLUDE_COLOR, what="the redone include marker")

    web.keep_page_screenshot(page, "web-prompt-markers.jpg")


def test_a_box_prompt_shows_its_outline_on_its_slice_and_leaves_on_undo(site, page, right_lung_voxel):
    """Choosing Box and dragging at once draws a box, not a point at the press (the tool is taken
    by a trigger: a state change waits while the view has requests in flight)."""
    url = site["url"]
    fresh_segment(page, url, BLUE)
    i, j, k = right_lung_voxel
    corners = (i - 10, j - 10, k - 1), (i + 10, j + 10, k - 1)
    edge = (i, j - 10, k - 1)  # the middle of its top side
    show_slice(page, url, k - 1)
    assert marker_pixels(page, url, edge, BOX_COLOR) < MIN_MARKER_PX
    draw_box(page, url, *corners)
    shows(page, url, edge, BOX_COLOR, what="the box outline")
    show_slice(page, url, k - 2)
    shows(page, url, edge, BOX_COLOR, present=False, what="the box on another slice")
    show_slice(page, url, k - 1)
    button(page, "Undo").click()
    shows(page, url, edge, BOX_COLOR, present=False, what="the undone box")
    page.keyboard.press("Escape")


def draw_box(page, url, corner_a, corner_b):
    """Press, drag and release with the box tool from one voxel to the other (on the shown slice)."""
    choose_tool(page, "Box")
    state = web.status(page, url)
    (xa, ya), (xb, yb) = (web.ijk_to_view_point(state, c) for c in (corner_a, corner_b))
    origin = red(page).bounding_box()
    before = prompt_number(page, url)
    page.mouse.move(origin["x"] + xa, origin["y"] + ya)
    page.mouse.down()
    for t in np.linspace(0.2, 1.0, 5):
        page.mouse.move(origin["x"] + xa + t * (xb - xa), origin["y"] + ya + t * (yb - ya))
    page.mouse.up()
    prompt = wait_prompt(page, url, before)["last_prompt"]
    assert prompt["kind"] == "box", f"the drag placed {prompt['kind']!r}, not a box"


def shown_slice(page, url):
    return round(red_slice(web.status(page, url)))


def test_next_uncertain_slice_shows_a_flagged_slice_after_propagate(site, page, right_lung_voxel):
    from MedSAM2Lib.review import next_flagged

    url = site["url"]
    fresh_segment(page, url, BLUE)
    choose_tool(page, "Include point")
    click_voxel(page, url, right_lung_voxel)
    page.keyboard.press("Escape")
    (record,) = web.status(page, url)["review"]  # the clicked slice, confident enough
    assert record["frame"] == MIDDLE and record["source"] == "prompt" and not record["flagged"], record
    button(page, "Next uncertain slice").click()
    page.get_by_role("status").filter(has_text="No uncertain slices").wait_for(timeout=10_000)
    assert shown_slice(page, url) == MIDDLE

    button(page, "Propagate").click()
    page.get_by_role("progressbar", name="Progress").wait_for(timeout=30_000)
    state = web.wait_idle(page, url, timeout=300)
    review = web.wait_until(lambda: len(web.status(page, url)["review"]) == SLICES and web.status(page, url)["review"],
                            30, what="the review of every slice")
    assert [r["frame"] for r in review] == list(range(SLICES)) and state["error"] == ""
    # a stricter review than the default: the less confident half of the slices is flagged
    typed = f"{sorted(r['confidence'] for r in review)[SLICES // 2]:.6f}"
    field = page.get_by_label("Flag below confidence")
    field.fill(typed)
    field.press("Tab")
    review = web.wait_until(lambda: (r := web.status(page, url)["review"]) and any(x["flagged"] for x in r) and r,
                            10, what="flagged slices")
    flagged = [r["frame"] for r in review if r["flagged"]]
    low = [r["frame"] for r in review if 0 < r["area"] and r["confidence"] < float(typed)]
    assert low and [r["frame"] for r in review if "low-confidence" in r["reason"]] == low
    assert set(low) <= set(flagged) and all(r["reason"] for r in review if r["flagged"])

    cells = page.get_by_role("group", name="Review strip").get_by_role("button")
    assert cells.count() == SLICES
    assert [cells.nth(f).get_attribute("data-flagged") == "true" for f in range(SLICES)] == \
        [f in flagged for f in range(SLICES)]

    expected = next_flagged(flagged, MIDDLE)
    button(page, "Next uncertain slice").click()
    web.wait_until(lambda: shown_slice(page, url) == expected, 10, what=f"the Red view to show slice {expected}")
    assert expected in flagged and expected != MIDDLE
    page.wait_for_timeout(1500)  # the view streams: let its image catch up before the picture
    web.keep_page_screenshot(page, "web-review-strip.jpg")  # docs/slicer.md's, when asked
    page.keyboard.press("Shift+N")  # back: the flagged slice before it, cycling
    back = next_flagged(flagged, expected, backwards=True)
    web.wait_until(lambda: shown_slice(page, url) == back, 10, what=f"Shift+N to show slice {back}")
    cells.nth(2).click()  # a strip cell shows its slice
    web.wait_until(lambda: shown_slice(page, url) == 2, 10, what="the clicked cell's slice")
