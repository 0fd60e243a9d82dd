"""The example Flower App (``examples/flower_app``) runs under ``flwr run`` and gives the
in-process fit's posterior.

Slow: ``flwr run`` starts a local SuperLink and Flower's simulation engine with 85
SuperNodes (about 30 s on two cores). The SuperLink is stopped by its process afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import hierfl as hf  # noqa: E402
from hierfl.flower import OFFLINE_ENVIRONMENT  # noqa: E402
from models import radon  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
SAMPLES = 300


def _stop_local_superlink(home: Path) -> None:
    """Stop the SuperLink (and its SuperExec) that ``flwr run`` left running for ``home``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    processes = [line.strip().partition(" ")[::2] for line in out.splitlines()]
    links = [pid for pid, args in processes if str(home) in args and "flower-superlink" in args]
    execs = [
        pid
        for pid, args in processes
        if "flower-superexec" in args and any(f"--parent-pid {link}" in args for link in links)
    ]
    for pid in links + execs:
        os.kill(int(pid), signal.SIGTERM)


@pytest.mark.slow
def test_flwr_run_of_the_example_app_gives_the_in_process_posterior(tmp_path):
    home, output = tmp_path / "flwr-home", tmp_path / "radon.npz"
    env = dict(
        os.environ,
        **OFFLINE_ENVIRONMENT,
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    command = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        ".",
        "--stream",
        "--federation-config",
        "num-supernodes=85",
        "--run-config",
        f'num-warmup={SAMPLES} num-samples={SAMPLES} num-chains=2 output="{output}"',
    ]
    try:
        run = subprocess.run(command, cwd=APP, env=env, capture_output=True, text=True, timeout=400)
    finally:
        _stop_local_superlink(home)
    assert "85 of 85 counties received" in run.stdout + run.stderr, run.stdout + run.stderr
    draws = np.load(output)
    reference = hf.fit(
        radon.family(),
        radon.load(),
        method="exact",
        num_warmup=SAMPLES,
        num_samples=SAMPLES,
        num_chains=2,
    )
    for site in ("beta", "sigma", "tau"):
        ours = draws[site]
        theirs = np.asarray(reference.global_samples[site]).reshape(ours.shape)
        sd = theirs.std(axis=0)
        # same statistics and keys; float rounding in the statistics moves the chains, so
        # the means agree to Monte Carlo error (a few tenths of a posterior sd at 600 draws)
        assert np.all(np.abs(ours.mean(axis=0) - theirs.mean(axis=0)) < 0.25 * sd), site
        np.testing.assert_allclose(ours.std(axis=0), sd, rtol=0.25)
