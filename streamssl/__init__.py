"""streamssl: continuous SwAV pretraining of image encoders from an unbounded image stream."""

__version__ = "0.1.0"
