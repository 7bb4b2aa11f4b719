"""The engine: requests, paged KV cache, scheduler, runner, sampler."""
