"""Cost per token, monthly cost and the break-even volume against an API.

    cost per 1K tokens   = hourly cost / 3600 / delivered tokens per s x 1000
    delivered tokens/s   = serving capacity x utilization
    monthly cost         = hourly cost x 730 h   (the GPUs are rented around the clock)
    API cost per output  = output price + input price x (avg prompt / avg output)   (per 1M tokens)
    break-even per day   = monthly cost / (365 / 12) / API cost per output token

Volumes are output tokens; each is assumed to bring ``avg_prompt / avg_output`` input tokens,
which the API bills and the self-hosted server serves for the rent it pays anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

HOURS_PER_MONTH = 730.0  # 24 x 365 / 12
DAYS_PER_MONTH = 365 / 12
SECONDS_PER_DAY = 86400


def cost_per_1k_tokens(hourly_cost: float, tokens_per_s: float) -> float:
    """Dollars per 1,000 tokens for a machine costing ``hourly_cost`` and producing ``tokens_per_s``."""
    return hourly_cost / 3600 / tokens_per_s * 1000


def monthly_cost(hourly_cost: float) -> float:
    return hourly_cost * HOURS_PER_MONTH


def api_cost_per_output_token(input_price_1m: float, output_price_1m: float, prompt_len: int, output_len: int) -> float:
    """What the API charges per output token, counting the input tokens that come with it."""
    return (output_price_1m + input_price_1m * prompt_len / output_len) / 1e6


def breakeven_tokens_per_day(monthly: float, api_cost_per_token: float) -> float | None:
    """Daily output tokens at which the API bill equals ``monthly``; None when the API is free."""
    if api_cost_per_token <= 0:
        return None
    return monthly / DAYS_PER_MONTH / api_cost_per_token


@dataclass(frozen=True)
class CostInputs:
    gpu_hourly_price: float
    num_gpus: int
    serving_tokens_per_s: float
    utilization: float
    api_input_price: float
    api_output_price: float
    avg_prompt_len: int
    avg_output_len: int
    ops_hours_per_month: float
    ops_hourly_rate: float


@dataclass(frozen=True)
class CostPlan:
    gpu_hourly_price: float
    hourly_cost: float
    cost_per_1k_output_tokens: float
    cost_per_1m_output_tokens: float
    monthly_cost: float
    monthly_cost_per_gpu: float
    monthly_ops_cost: float
    monthly_cost_with_ops: float
    api_cost_per_1m_output_tokens: float
    breakeven_tokens_per_day: float | None
    breakeven_tokens_per_day_with_ops: float | None
    output_tokens_per_day_capacity: float
    breakeven_reachable: bool


def plan_cost(c: CostInputs) -> CostPlan:
    hourly = c.gpu_hourly_price * c.num_gpus
    per_1k = cost_per_1k_tokens(hourly, c.serving_tokens_per_s * c.utilization)
    monthly = monthly_cost(hourly)
    ops = c.ops_hours_per_month * c.ops_hourly_rate
    api_per_token = api_cost_per_output_token(c.api_input_price, c.api_output_price, c.avg_prompt_len, c.avg_output_len)
    capacity = c.serving_tokens_per_s * SECONDS_PER_DAY
    breakeven_ops = breakeven_tokens_per_day(monthly + ops, api_per_token)
    return CostPlan(
        gpu_hourly_price=c.gpu_hourly_price,
        hourly_cost=hourly,
        cost_per_1k_output_tokens=per_1k,
        cost_per_1m_output_tokens=per_1k * 1000,
        monthly_cost=monthly,
        monthly_cost_per_gpu=monthly / c.num_gpus,
        monthly_ops_cost=ops,
        monthly_cost_with_ops=monthly + ops,
        api_cost_per_1m_output_tokens=api_per_token * 1e6,
        breakeven_tokens_per_day=breakeven_tokens_per_day(monthly, api_per_token),
        breakeven_tokens_per_day_with_ops=breakeven_ops,
        output_tokens_per_day_capacity=capacity,
        breakeven_reachable=breakeven_ops is not None and breakeven_ops <= capacity,
    )
