"""Data pipeline: shard writing and reading, decoding with size/crop conditioning, buckets."""
