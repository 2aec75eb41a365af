"""Files in and out of the engine: volumes (NRRD, NIfTI, MHA, DICOM), prompt files, and the one way
outputs are written (atomic, with the umask's permissions) and image files are read (files.py)."""
