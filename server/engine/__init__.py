"""The generation engine: requests, the slot KV cache, the mixed-prefix runner, the sampler."""
