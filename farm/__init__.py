"""farm: a render farm for generative video on Ray."""

__version__ = "0.1.0"
