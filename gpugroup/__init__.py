"""gpugroup: exact, backend-independent sample-then-group for ptychography scans.

``sample_groups`` picks the groups (DESIGN.md section 3); ``RawData`` holds a scan and
assembles the grouped training arrays (section 2). CPU and GPU backends give the same
integer groups for the same seed.
"""

import logging

from gpugroup.dataset import GroupedDataset
from gpugroup.grouping import sample_groups
from gpugroup.rawdata import RawData
from gpugroup.schema import ScanFileError

__version__ = "0.1.0"
__all__ = ["RawData", "sample_groups", "GroupedDataset", "ScanFileError", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
