"""The scan fields of DESIGN.md section 1 and the error for files that hold no scan: the
names every reader, writer and driver agrees on."""

from __future__ import annotations

#: Keys whose arrays are frame stacks: left on disk (memory-mapped / datasets) when lazy.
STACK_KEYS = ("diff3d", "diffraction", "Y", "X_full")
#: The scan fields of DESIGN.md section 1 (``_metadata`` is a JSON string).
SCAN_FIELDS = ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d", "probeGuess",
               "scan_index", "objectGuess", "Y", "norm_Y_I")
REQUIRED_FIELDS = ("xcoords", "ycoords", "diff3d", "probeGuess")


class ScanFileError(OSError, ValueError):
    """A scan file that cannot be read as any supported format."""
