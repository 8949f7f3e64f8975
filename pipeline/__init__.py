"""Stages and models of the emotion-recognition pipeline. Importing it does no work."""
__version__ = "0.1.0"
