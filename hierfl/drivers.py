"""Pick the driver that runs a federated algorithm: the in-process simulator or Flower.

:func:`drive` is what ``hf.fit(..., driver=...)`` calls; both drivers run the same pure
functions (:class:`~hierfl.protocol.FederatedAlgorithm`) with the same keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .protocol import ClientGroups, FederatedAlgorithm, SimulationResult, simulate

__all__ = ["DRIVERS", "drive"]

PyTree = Any

#: names of the drivers :func:`drive` runs an algorithm with
DRIVERS = ("simulate", "flower")


def drive(
    driver: str,
    make_algorithm: Callable[[], FederatedAlgorithm],
    key,
    client_data: PyTree,
    *,
    client_ids: tuple,
    num_rounds: int,
    participation: float = 1.0,
    dropout: float = 0.0,
    progress: bool | str = False,
    **options,
) -> SimulationResult:
    """Run ``make_algorithm()`` with the driver named ``driver`` (one of :data:`DRIVERS`).

    ``"simulate"``: :func:`hierfl.protocol.simulate`, in process. ``"flower"``:
    :func:`hierfl.flower.run_simulation`, Flower's simulation engine with one SuperNode per
    client (the ``flower`` extra); the same keys give the same result, up to float rounding.
    There, clients drop out when their node fails, so a simulated ``dropout`` is refused.
    ``make_algorithm`` must be picklable for Flower (e.g. a :func:`functools.partial`).
    ``options`` (``state``, ``start_round``, ``converged``, ``on_round``,
    ``final_broadcast``) go to either driver; ``corrupt`` and :class:`ClientGroups` data to
    the simulator only.
    """
    if driver == "simulate":
        return simulate(
            make_algorithm(),
            key,
            client_data,
            client_ids=client_ids,
            num_rounds=num_rounds,
            participation=participation,
            dropout=dropout,
            progress=progress,
            **options,
        )
    if driver != "flower":
        raise ValueError(f"driver must be one of {DRIVERS}, got {driver!r}")
    if dropout:
        raise ValueError(
            f"driver='flower' takes no simulated dropout (got {dropout}): under Flower a client "
            "drops out when its node fails or does not reply; use driver='simulate' to simulate it"
        )
    if isinstance(client_data, ClientGroups):
        raise ValueError("driver='flower' runs every client on its own node: pass stacked data")
    if options.get("corrupt") is not None:
        raise ValueError(
            "driver='flower' takes no fault injector (corrupt=): use driver='simulate'"
        )
    options.pop("corrupt", None)
    try:
        from .flower import run_simulation
    except ImportError as error:
        raise ImportError(
            "driver='flower' needs Flower's simulation engine: pip install 'hierfl[flower]'"
        ) from error
    return run_simulation(
        make_algorithm,
        key,
        client_data,
        client_ids=client_ids,
        num_rounds=num_rounds,
        participation=participation,
        progress=progress,
        **options,
    )
