"""Reading ZeRO-3 partitioned parameters outside their module's forward: gather only those partitioned now."""
from __future__ import annotations

import contextlib


def partitioned_now(params) -> list:
    """The ZeRO-3 parameters among `params` that are partitioned now; the others are ordinary tensors or whole
    (ZeRO-3's persistent parameters, weights its coordinator keeps between uses or a training phase holds). Every
    rank holds the same ones partitioned (the same module calls release the same weights), so every rank gathers
    the same."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return []
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]


def gathered(params):
    """Context that makes ZeRO-3 partitioned `params` readable (read-only); a no-op for ordinary tensors.

    Only the ones partitioned now are gathered, and released after: whole ones are readable already and stay as they
    are, where GatheredParameters would release every parameter it is given."""
    partitioned = partitioned_now(params)
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
