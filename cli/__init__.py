"""Thin click entry points: parse options, build a config, call one pipeline stage."""
