"""pdserve engine core: models, paged KV cache, scheduler, runner and the library API."""
from engine.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
