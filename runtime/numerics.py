"""Finding NaN and inf: where a run must stop rather than report or save numbers computed from them."""
import math
from typing import Callable, Iterable

import torch

from runtime.errors import NonFiniteError


def first_nonfinite_row(tensor: torch.Tensor) -> int | None:
    """The first index along dim 0 whose values include a NaN or an inf; None when every value
    is finite (one device synchronisation)."""
    if tensor.numel() == 0:
        return None
    finite_rows = torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(dim=1)
    if bool(finite_rows.all()):
        return None
    return int((~finite_rows).nonzero()[0])


def require_finite(tensor: torch.Tensor, message: Callable[[int], str]) -> None:
    """Raise NonFiniteError with `message(first non-finite row)` unless `tensor` is all finite."""
    row = first_nonfinite_row(tensor)
    if row is not None:
        raise NonFiniteError(message(row))


def first_nonfinite_tensor(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first tensor holding a NaN or an inf (None entries skipped); None when
    all are finite. One device synchronisation for all of them.

    A finite sum means finite values, and a sum (accumulated in fp32) makes no elementwise copy
    of a large tensor, such as the logits of `rank` QA inference; only a non-finite sum, which
    huge finite values can also reach, is confirmed value by value.
    """
    named = [(name, tensor) for name, tensor in named if tensor is not None]
    if not named:
        return None
    sums = torch.stack([tensor.sum(dtype=torch.float32) for _, tensor in named])
    if bool(torch.isfinite(sums).all()):
        return None
    return next((name for name, tensor in named if not bool(torch.isfinite(tensor).all())), None)


def nonfinite_name(value: float) -> str:
    """'NaN', 'inf' or '-inf', as a message names a value."""
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
