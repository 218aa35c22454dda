"""tadrop: streaming, data-free model merging with TADrop (tensor-wise adaptive drop)."""

__version__ = "0.1.0"
