"""Writers of on-disk formats. Each format is one module plus one entry in `FORMATS`."""

FORMATS = {"compressed-tensors": "frugal.export.compressed_tensors:save"}
