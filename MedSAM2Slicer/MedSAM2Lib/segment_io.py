"""Read and write whole frames of one segment through its binary labelmap, nothing more.

Only frames whose content changed are written, each run of consecutive frames as one extent.
Usually the run is set straight in the segment's labelmap array (the labelmap is first grown
once to the volume's grid) and the labelmap's Modified() tells the segmentation, as Slicer's
util.arrayFromSegmentInternalBinaryLabelmap documents: the cost is that of the slab, not of the
segment. Where that would overwrite another segment sharing the labelmap layer, the run goes
through vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment instead, the way Segment
Editor effects modify a segment: a MERGE_MIN pass clears the segment's voxels outside the new mask
inside the extent, then a MERGE_MASK pass sets the voxels inside it, and Slicer moves the segment
to its own layer. Either way only this segment's voxels in the changed frames change.
(MODE_REPLACE is not used: on a shared layer it clears the whole segment, not just the extent.)
"""

import numpy as np

from medsam2.errors import InputError

from .geometry import grids_match, labelmap_geometry, numpy_to_vtk_matrix, vtk_to_numpy_matrix

BINARY_LABELMAP = "Binary labelmap"


def pack(mask):
    """bool (rows, cols) -> compact record for undo (1 bit per pixel)."""
    return (mask.shape, np.packbits(mask, axis=None))


def unpack(record):
    shape, bits = record
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


def contiguous_runs(frames):
    """Sorted frame indices -> [(first, last), ...] runs of consecutive frames."""
    runs = []
    for f in sorted(frames):
        if runs and f == runs[-1][1] + 1:
            runs[-1][1] = f
        else:
            runs.append([f, f])
    return [tuple(r) for r in runs]


class SegmentFrames:
    """One segment of a segmentation node, seen as frames of one volume's voxel grid."""

    def __init__(self, segmentation_node, segment_id, volume_geometry):
        import slicer

        self.node = segmentation_node
        self.segment_id = segment_id
        self.volume = volume_geometry
        self._logic = slicer.vtkSlicerSegmentationsModuleLogic
        self._resample = slicer.vtkOrientedImageDataResample
        self._oriented_image = slicer.vtkOrientedImageData
        self.matrix = labelmap_geometry(volume_geometry, segmentation_node)
        self.write_log = []  # VTK extents written, newest last (a diagnostic the tests read)
        self.segment()  # fail early with a clear message
        self._check_source_representation()
        self._adopt_existing_grid()

    # --- checks ---------------------------------------------------------------------------
    def segment(self):
        segmentation = self.node.GetSegmentation()
        segment = segmentation.GetSegment(self.segment_id)
        if segment is None:
            raise InputError(
                f"Segment '{self.segment_id}' is not in segmentation '{self.node.GetName()}' any more. "
                "Select or add a segment, then try again.")
        return segment

    def _check_source_representation(self):
        segmentation = self.node.GetSegmentation()
        getter = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
        if getter() != BINARY_LABELMAP:
            raise InputError(
                f"Segmentation '{self.node.GetName()}' is stored as '{getter()}', not as a binary labelmap. "
                "In the Segmentations module, open Representations, create 'Binary labelmap' and make it "
                "the source representation, then try again.")

    def _labelmap(self):
        return self.segment().GetRepresentation(BINARY_LABELMAP)

    @staticmethod
    def _is_empty(image):
        if image is None:
            return True
        e = image.GetExtent()
        return e[0] > e[1] or e[2] > e[3] or e[4] > e[5] or image.GetPointData().GetScalars() is None

    def _adopt_existing_grid(self):
        """Write on the grid the segment already has; refuse a different grid (resampling would blur)."""
        image = self._labelmap()
        if self._is_empty(image):
            if not _has_reference_geometry(self.node):
                # so Segment Editor paints on the same grid afterwards
                self.node.SetReferenceImageGeometryParameterFromVolumeNode(self.volume.node)
            return
        self._check_grid(image)
        self.matrix = _image_to_world(image)  # exactly the stored grid, so Slicer sees matching geometries

    def _same_grid(self, image):
        return grids_match(_image_to_world(image), self.matrix, np.linalg.norm(self.matrix[:3, :3], axis=0))

    def _check_grid(self, image):
        if not self._same_grid(image):
            raise InputError(
                f"Segmentation '{self.node.GetName()}' already holds a labelmap on a different voxel grid "
                f"than volume {self.volume.name}, so MedSAM2 would have to resample it. Use a new "
                "segmentation for this volume, or in Segment Editor set its geometry from this volume "
                "('Specify geometry' button) before segmenting.")

    # --- reading --------------------------------------------------------------------------
    def read(self, layout, first, last=None):
        """This segment's voxels on frames first..last as bool (n, rows, cols)."""
        last = first if last is None else last
        ext = layout.extent(first, last)
        out = np.zeros((ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1), dtype=bool)
        image = self._labelmap()
        if not self._is_empty(image):
            label = self.segment().GetLabelValue()
            if self._same_grid(image):
                _copy_overlap(image, ext, out, label)
            else:  # the segment was moved to another grid meanwhile; read it resampled
                out[:] = self._read_resampled(image, ext, label)
        return layout.slab_from_kji(out)

    def _read_resampled(self, image, ext, label):
        reference = self._oriented_image()
        reference.SetExtent(*ext)
        reference.SetImageToWorldMatrix(numpy_to_vtk_matrix(self.matrix))
        resampled = self._oriented_image()
        self._resample.ResampleOrientedImageToReferenceOrientedImage(image, reference, resampled)
        values = _scalars(resampled)
        return (values == label) if values is not None else False

    # --- writing --------------------------------------------------------------------------
    def write(self, layout, masks):
        """Write {frame: bool (rows, cols)}; only frames whose content differs are touched.

        Returns {frame: (old, new)} packed records of the frames actually changed.
        """

        changed = {}
        for first, last in contiguous_runs(masks):
            current = self.read(layout, first, last)
            for i, f in enumerate(range(first, last + 1)):
                new = np.asarray(masks[f], dtype=bool)
                if new.shape != current[i].shape:
                    raise InputError(f"Mask for frame {f} has shape {new.shape}, expected {current[i].shape}.")
                if not np.array_equal(new, current[i]):
                    changed[f] = (pack(current[i]), pack(new))
        if not changed:
            return changed
        self._check_source_representation()
        image = self._labelmap()
        if not self._is_empty(image):
            self._check_grid(image)  # else Slicer would resample the whole segment onto our slab
        in_place = False
        for first, last in contiguous_runs(changed):
            ext = layout.extent(first, last)
            slab = np.stack([np.asarray(masks[f], dtype=bool) for f in range(first, last + 1)])
            kji = np.ascontiguousarray(layout.slab_to_kji(slab))
            if self._write_in_place(ext, kji):
                in_place = True
            else:
                self._write_with_slicer_logic(ext, kji)
            self.write_log.append(tuple(ext))
        if in_place:
            # the segmentation observes its labelmaps: this refreshes views and derived representations
            self._labelmap().Modified()
        # slice views redraw a segment on its own Modified event (a labelmap change alone left
        # trame-slicer's views stale)
        self.segment().Modified()
        return changed

    def _write_in_place(self, ext, kji):
        """Set the slab straight in the segment's labelmap array: O(slab), not O(segment).

        Only where that is exactly what Slicer's logic would do: same voxel grid, the label value
        fits the array's type, and no other segment of a shared layer lies under the new mask
        (there, Slicer moves this segment to its own layer: the fallback does that).
        """
        image = self._labelmap()
        if image is None:
            return False
        if self._is_empty(image):
            self._allocate_full(image)  # empty: so is every segment sharing it (distinct labels)
        elif not self._same_grid(image):
            return False
        elif not _contains(image.GetExtent(), ext):
            self._pad_to_full(image)
        values = _scalars(image)
        label = self.segment().GetLabelValue()
        if values is None or not np.issubdtype(values.dtype, np.integer) or np.iinfo(values.dtype).max < label:
            return False
        e = image.GetExtent()
        region = values[ext[4] - e[4]:ext[5] - e[4] + 1, ext[2] - e[2]:ext[3] - e[2] + 1, ext[0] - e[0]:ext[1] - e[0] + 1]
        others = (region != 0) & (region != label)
        if (others & kji).any():
            return False
        region[(region == label) & ~kji] = 0
        region[kji] = label
        return True

    def _full_extent(self):
        d = self.volume.dims
        return (0, d[0] - 1, 0, d[1] - 1, 0, d[2] - 1)

    def _allocate_full(self, image):
        """An empty labelmap becomes a zero array on the volume's whole grid."""
        import vtk

        image.SetExtent(*self._full_extent())
        image.SetImageToWorldMatrix(numpy_to_vtk_matrix(self.matrix))
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        _scalars(image)[:] = 0

    def _pad_to_full(self, image):
        """Grow the labelmap to the volume's whole grid once (zero padding keeps every segment)."""
        import vtk

        pad = vtk.vtkImageConstantPad()
        pad.SetInputData(image)
        full = [min(a, b) if i % 2 == 0 else max(a, b) for i, (a, b) in enumerate(zip(self._full_extent(), image.GetExtent()))]
        pad.SetOutputWholeExtent(*full)
        pad.SetConstant(0)
        pad.Update()
        image.ShallowCopy(pad.GetOutput())  # as Slicer's own shrink/pad does; keeps the directions

    def _write_with_slicer_logic(self, ext, kji):
        import vtk
        from vtk.util import numpy_support

        modifier = self._oriented_image()
        modifier.SetExtent(*ext)
        modifier.SetImageToWorldMatrix(numpy_to_vtk_matrix(self.matrix))
        modifier.GetPointData().SetScalars(numpy_support.numpy_to_vtk(kji.astype(np.uint8).ravel(), deep=True,
                                                                       array_type=vtk.VTK_UNSIGNED_CHAR))
        logic = self._logic
        ok = logic.SetBinaryLabelmapToSegment(modifier, self.node, self.segment_id, logic.MODE_MERGE_MIN, ext)
        ok = logic.SetBinaryLabelmapToSegment(modifier, self.node, self.segment_id, logic.MODE_MERGE_MASK, ext) and ok
        if not ok:
            raise InputError(f"Slicer refused to write frames {ext} into segment '{self.segment_id}'.")


def _has_reference_geometry(node):
    return bool(node.GetSegmentation().GetConversionParameter("Reference image geometry"))


def _contains(outer, inner):
    return all(outer[2 * a] <= inner[2 * a] and inner[2 * a + 1] <= outer[2 * a + 1] for a in range(3))


def _image_to_world(image):
    import vtk

    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return vtk_to_numpy_matrix(m)


def _scalars(image):
    from vtk.util import numpy_support

    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return None
    e = image.GetExtent()
    return numpy_support.vtk_to_numpy(scalars).reshape(e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)


def _copy_overlap(image, ext, out, label):
    """out (KJI over `ext`) |= image == label where the two extents overlap (no resampling)."""
    values = _scalars(image)
    if values is None:
        return
    e = image.GetExtent()
    lo = [max(ext[2 * a], e[2 * a]) for a in range(3)]
    hi = [min(ext[2 * a + 1], e[2 * a + 1]) for a in range(3)]
    if any(lo[a] > hi[a] for a in range(3)):
        return
    src = values[lo[2] - e[4]:hi[2] - e[4] + 1, lo[1] - e[2]:hi[1] - e[2] + 1, lo[0] - e[0]:hi[0] - e[0] + 1]
    out[lo[2] - ext[4]:hi[2] - ext[4] + 1, lo[1] - ext[2]:hi[1] - ext[2] + 1,
        lo[0] - ext[0]:hi[0] - ext[0] + 1] = src == label
