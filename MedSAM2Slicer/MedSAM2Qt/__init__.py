"""Qt pieces of the Slicer module's shell that are more than wiring (MedSAM2.py stays the module's
one face): the install dialogs and the review strip. Runs only inside Slicer (qt, slicer.util)."""
