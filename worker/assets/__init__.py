"""Pure exporters: arrays in, bytes out."""
