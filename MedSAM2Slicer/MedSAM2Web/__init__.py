"""MedSAM2 in a web browser: the third thin shell beside the Slicer module (MedSAM2.py).

Slicer's own slice views run offscreen on slicer-core and stream to the page through
trame-slicer; prompts, propagation and undo go through MedSAM2Lib exactly as in Slicer. Imports
MedSAM2Lib and medsam2, never Qt. Started by `medsam2 web` (cli.py); needs the `[web]` extra.
"""
