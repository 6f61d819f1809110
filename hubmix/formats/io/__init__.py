"""Lazy tensor readers and the streaming safetensors writer.

Readers hand out zero-copy views of tensors (memory-mapped safetensors, mmap-loaded torch pickles), so opening a
model costs only its header; the writer lays out a file from planned shapes and fills it in any order.
"""

from hubmix.formats.io.readers import WeightFile, open_weight_file
from hubmix.formats.io.writer import PlannedTensor, SafetensorsWriter

__all__ = ["WeightFile", "open_weight_file", "PlannedTensor", "SafetensorsWriter"]
