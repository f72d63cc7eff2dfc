"""Every change this plugin makes to vLLM's own behaviour, one module per vLLM target.

The index with Why / How / Upstream / Remove-when for each patch is ``README.md``
beside this file. Each patch keeps the original, checks the contract it relies
on (failing loudly with the symbol's name when vLLM changed), and marks what it
patched so that applying it twice is harmless: plugins load in every process,
sometimes more than once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

_MARK = "_vllm_moe_offload_original"


class PatchContractError(RuntimeError):
    """vLLM no longer looks the way a patch expects."""


def expect_params(owner: Any, attr: str, params: Sequence[str]) -> Callable:
    """Return ``owner.attr`` after checking it takes ``params`` (in order, as a prefix).

    Raises :class:`PatchContractError` naming the symbol when it is missing or
    its signature differs.
    """
    symbol = f"{getattr(owner, '__module__', '?')}.{getattr(owner, '__qualname__', owner)}.{attr}"
    func = inspect.getattr_static(owner, attr, None)
    if func is None:
        raise PatchContractError(f"vllm-moe-offload: {symbol} is missing; this vLLM is not supported")
    raw = func.__func__ if isinstance(func, (staticmethod, classmethod)) else func
    raw = getattr(raw, _MARK, raw)
    got = list(inspect.signature(raw).parameters)[: len(params)]
    if got != list(params):
        raise PatchContractError(
            f"vllm-moe-offload: {symbol} takes {got}, expected {list(params)}; this vLLM is not supported"
        )
    return func


def expect_attrs(obj: Any, what: str, attrs: Sequence[str]) -> None:
    """Check that ``obj`` (vLLM's ``what``, for the message) has every one of ``attrs``.

    Raises :class:`PatchContractError` naming the first one missing.
    """
    for attr in attrs:
        if not hasattr(obj, attr):
            raise PatchContractError(f"vllm-moe-offload: {what}.{attr} is missing; this vLLM is not supported")


def is_patched(owner: Any, attr: str) -> bool:
    func = inspect.getattr_static(owner, attr, None)
    raw = func.__func__ if isinstance(func, (staticmethod, classmethod)) else func
    return hasattr(raw, _MARK)


def mark(wrapper: Callable, original: Callable) -> Callable:
    """Tag ``wrapper`` as ours, keeping a handle on the original."""
    setattr(wrapper, _MARK, original)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


def apply_all() -> None:
    """Apply every runtime patch (idempotent). Called by ``register()``."""
    from vllm_moe_offload.patches import async_llm, cpu_executor, default_loader, engine_args, scheduler, weight_utils

    engine_args.apply()
    cpu_executor.apply()
    weight_utils.apply()
    default_loader.apply()
    scheduler.apply()
    async_llm.apply()
