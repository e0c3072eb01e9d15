"""Scan and grouped-data files: NPZ (memory-mapped members), ``.npy`` directories, HDF5
(``.h5``/``.hdf5``/``.cxi``) and Zarr (``.zarr``), read lazily and written in slabs.

The parts: :mod:`~gpugroup.io.formats` (the table of formats), :mod:`~gpugroup.io.scan`
(whole scans in and out), :mod:`~gpugroup.io.atomic` (outputs that appear whole or not at
all), :mod:`~gpugroup.io.frames` (frames at scattered indices, file identity),
:mod:`~gpugroup.io.grouped` (the grouped-output layout). h5py and zarr are imported only
when such a file is used.
"""

from gpugroup.io.atomic import (
    atomic_path,
    check_free_space,
    check_interrupted,
    check_output,
    same_path,
    signals_deferred,
    write_error,
)
from gpugroup.io.formats import (
    FORMATS,
    OUTPUT_SUFFIXES,
    Format,
    format_of,
    open_target,
    output_format,
)
from gpugroup.io.frames import open_regular, stat_input
from gpugroup.io.scan import (
    DEFAULT_SLAB_BYTES,
    check_keys,
    copy_stack,
    missing_fields_error,
    read_scan,
    read_scan_slabs,
    write_scan,
)
from gpugroup.schema import SCAN_FIELDS, STACK_KEYS, ScanFileError

__all__ = ["DEFAULT_SLAB_BYTES", "FORMATS", "Format", "OUTPUT_SUFFIXES", "SCAN_FIELDS",
           "STACK_KEYS", "ScanFileError", "atomic_path", "check_free_space", "check_interrupted",
           "check_keys", "check_output", "copy_stack", "format_of", "missing_fields_error",
           "open_regular", "open_target", "output_format", "read_scan", "read_scan_slabs",
           "same_path", "signals_deferred", "stat_input", "write_error", "write_scan"]
