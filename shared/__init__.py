"""tierserve common library: one home per concept (manifest, codec, calibration, tier loop, ...)."""

__version__ = "0.1.0"
