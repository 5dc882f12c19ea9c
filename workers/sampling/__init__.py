"""Sampling: the step's sampling inputs built from the persistent batch (``inputs``), the logits
processors (``processors``) and the sampler (``sampler``)."""

from workers.sampling.inputs import (
    GREEDY_EPS,
    HostBitmask,
    SamplingInputBuilder,
    StepSamplingInputs,
    profile_sampling_inputs,
    seeded_key,
)
from workers.sampling.sampler import SamplerOutput, SamplingMetadata, TokenBitmask, apply_processors, sample

__all__ = [
    "GREEDY_EPS",
    "HostBitmask",
    "SamplerOutput",
    "SamplingInputBuilder",
    "SamplingMetadata",
    "StepSamplingInputs",
    "TokenBitmask",
    "apply_processors",
    "profile_sampling_inputs",
    "sample",
    "seeded_key",
]
