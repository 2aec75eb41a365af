"""HTTP endpoints beside the page (behind the same access gate as the page itself):

- GET  /medsam2/status      what the page shows, as JSON (for scripts and the browser tests; with
                            ?masks=1 also each segment's voxels, bit-packed): volume geometry,
                            segments with voxel counts per slice, each visible slice view's
                            XY-to-RAS matrix and size, `last_prompt`, the latest prompt as the
                            engine received it, in voxel indices (IJK), and `review`, the current
                            segment's review records (docs/review.md).
- GET  /medsam2/download    the saved .seg.nrrd, as a download.
- POST /medsam2/open?name=F the request body is a volume file (NRRD, NIfTI, MHA); it replaces the
                            volume on the page. Bodies beyond the upload limit are refused.
"""

from __future__ import annotations

import os
import tempfile

from medsam2.errors import MedSAM2Error

STATUS_PATH = "/medsam2/status"
DOWNLOAD_PATH = "/medsam2/download"
OPEN_PATH = "/medsam2/open"
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # single-file formats
CHUNK = 1 << 20


def install(app, web_app, max_upload_mb: float) -> None:
    """Add the routes to wslink's aiohttp application `app` for the WebApp `web_app`."""
    from aiohttp import web

    async def status(request):
        return web.json_response(web_app.status(masks=request.query.get("masks") == "1"))

    async def download(request):
        if not web_app.state.saved or not os.path.isfile(web_app.output_path):
            return web.Response(status=404, text="Nothing saved yet: press Save first.")
        name = os.path.basename(web_app.output_path)
        return web.FileResponse(web_app.output_path, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def open_volume(request):
        name = os.path.basename(request.query.get("name", ""))
        suffix = next((s for s in VOLUME_SUFFIXES if name.lower().endswith(s)), None)
        if suffix is None:
            return web.Response(status=400, text=f"{name or 'The file'}: open a {', '.join(VOLUME_SUFFIXES)} file "
                                                 "(a DICOM folder: give it to `medsam2 web` on the command line).")
        limit = int(max_upload_mb * 1024 * 1024)
        too_large = web.Response(status=413, text=f"{name} is larger than the {max_upload_mb:g} MiB upload limit.")
        if request.content_length is not None and request.content_length > limit:
            return too_large
        folder = tempfile.mkdtemp(prefix="medsam2-web-")
        path = os.path.join(folder, name)
        try:
            size = 0
            with open(path, "wb") as f:
                async for chunk in request.content.iter_chunked(CHUNK):
                    size += len(chunk)
                    if size > limit:  # a body without (or lying about) its length
                        return too_large
                    f.write(chunk)
            with web_app.state:
                web_app.open_volume(path)
        except MedSAM2Error as exc:
            return web.Response(status=400, text=str(exc))
        finally:
            if os.path.exists(path):
                os.remove(path)
            os.rmdir(folder)
        return web.json_response({"volume": web_app.state.volume_name})

    app.router.add_get(STATUS_PATH, status)
    app.router.add_get(DOWNLOAD_PATH, download)
    app.router.add_post(OPEN_PATH, open_volume)  # streamed to disk: the size limit is ours
