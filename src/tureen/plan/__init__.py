"""Capacity and cost planner (``tureen plan``): memory, KV cache, concurrency, speed ceilings, cost.

Pure arithmetic over a checkpoint's ``config.json`` and a GPU catalogue; imports no torch.
"""

from tureen.plan.arch import ModelArch, ParamCount, arch_from_config, count_params
from tureen.plan.estimate import PlanEstimate, estimate
from tureen.plan.gpus import CATALOGUE, GpuSpec, find_gpu
from tureen.plan.options import PlanOptions

__all__ = ["estimate", "PlanEstimate", "PlanOptions", "ModelArch", "ParamCount", "arch_from_config",
           "count_params", "CATALOGUE", "GpuSpec", "find_gpu"]
