"""Files in and out of the engine: volumes (NRRD, NIfTI, MHA, DICOM) and prompt files."""
