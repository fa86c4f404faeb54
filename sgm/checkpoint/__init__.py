"""The official single-file SDXL checkpoint layout: key mapping, load, save, partial loads."""
