"""The CLI arguments and options several commands share: one spelling and one help text each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
UseCaseArg = Annotated[str, typer.Argument(help="use case NAME")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why (kept in the audit log)")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA when torch sees a device, else the CPU) | cpu | cuda.")
]
SharpenOpt = Annotated[
    str | None,
    typer.Option(
        "--sharpen",
        help="selection powers, e.g. 1.4,2: every estimator is also measured with its estimate raised to "
        "each, and a layer takes the one that keeps the fewest blocks (default: 1 only, the estimate as "
        "it is)",
    ),
]


def device_or_fail(name: str) -> Any:
    """--device -> torch.device, or exit 2 naming the option (cuda without a CUDA device is refused,
    never a silent CPU run)."""
    from sparse_core.bench.common import bench_device
    from sparsepilot.console import fail

    try:
        return bench_device(name)
    except ValueError as exc:
        fail(f"--device: {exc}")


T = TypeVar("T")


def number_list_option(option: str, text: str, check: Callable[[list[float]], T]) -> T:
    """'1.4,2' -> check([1.4, 2.0]), or exit 2 naming the option and what is wrong (not numbers, or
    the ValueError `check` raises)."""
    from sparsepilot.console import fail

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        fail(f"{option}: {text!r} is not a comma-separated list of numbers ({exc})")
    try:
        return check(values)
    except ValueError as exc:
        fail(f"{option}: {text!r}: {exc}")


def sharpen_option(text: str) -> tuple[float, ...]:
    """--sharpen '1.4,2' -> the selection powers calibration measures (1.0 always among them), or exit
    2 naming the option."""
    from sparse_core.calibration import sharpen_powers

    return number_list_option("--sharpen", text, sharpen_powers)
