"""Serving a trained prefix: decoding, banks of prefixes, evaluation of a workdir, PEFT files."""
