"""Command-line data tools: build webdataset shards from images, build the demo dataset."""
