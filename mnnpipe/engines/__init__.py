"""Thin, explicit wrappers around the inference engines mnnpipe drives (MNN)."""
