"""PAS appliance: the access point between a hospital's modalities and its regional platform."""

__version__ = "0.1.0"
