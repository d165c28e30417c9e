"""Layer cache: step keys, content digests, the key -> layer index, miss explanations."""
