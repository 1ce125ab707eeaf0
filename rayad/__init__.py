"""rayad: visual anomaly detection with self-supervised autoencoders (SDC-CCM), at cluster scale on Ray."""

__version__ = "0.1.0"
