"""The example Flower App (``examples/flower_app``) runs under ``flwr run`` and gives the
in-process fit's posterior, in both of Flower's runtimes.

Slow. Simulation runtime: ``flwr run`` starts a local SuperLink and Flower's simulation
engine with 85 SuperNodes (about 30 s on two cores); the SuperLink is stopped by its process
afterwards. Deployment runtime: a SuperLink and one SuperNode process per county (the first
four counties), on loopback ports, stopped afterwards (about 40 s).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
    _assert_same_posterior(np.load(output), radon.load())


def _assert_same_posterior(draws, data):
    reference = hf.fit(
        radon.family(),
        data,
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_example_app_on_a_superlink_with_real_supernodes(tmp_path):
    counties = 4
    home, output = tmp_path / "flwr-home", tmp_path / "radon.npz"
    home.mkdir()
    link = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = dict(
        os.environ,
        **OFFLINE_ENVIRONMENT,
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    bin_dir = Path(sys.executable).parent
    logs = [open(tmp_path / f"process-{i}.log", "w") for i in range(counties + 1)]
    commands = [
        [
            str(bin_dir / "flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--port",
            str(link),
            "--database",
            str(tmp_path / "state.db"),
        ]
    ] + [
        [
            str(bin_dir / "flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{link}",
            "--port",
            str(_free_port()),
            "--node-config",
            f"partition-id={i}",
        ]
        for i in range(counties)
    ]
    processes = []
    try:
        for command, log in zip(commands, logs, strict=True):
            processes.append(
                subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            time.sleep(3 if not processes[1:] else 0.5)  # the SuperLink first
        run = subprocess.run(
            [
                str(bin_dir / "flwr"),
                "run",
                ".",
                "loopback",
                "--stream",
                "--run-config",
                f"num-counties={counties} num-warmup={SAMPLES} num-samples={SAMPLES} "
                f'num-chains=2 output="{output}"',
            ],
            cwd=APP,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            process.wait(timeout=30)
        for log in logs:
            log.close()
    report = run.stdout + run.stderr
    assert f"{counties} of {counties} counties received" in report, report
    data = radon.load()
    _assert_same_posterior(np.load(output), data.subset(data.client_ids[:counties]))
