"""The stream: shard URLs from a source, tar members, checked images, samples (source -> samples)."""
