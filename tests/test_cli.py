"""The ``hierfl`` command's jobs run end to end and what they write is consistent."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from hierfl.cli import main, run_mnist


def test_radon_job_writes_its_outputs_and_shrinks_small_counties(tmp_path, capsys):
    assert (
        main(
            ["radon", "--out", str(tmp_path), "--num-samples", "300", "--num-warmup", "300"]
            + ["--num-chains", "2"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "85 counties" in printed
    for name in (
        "forest_county_intercepts.png",
        "shrinkage.png",
        "global_posterior.png",
        "county_summary.csv",
        "radon_partial_pooling.hfit",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = pd.read_csv(tmp_path / "county_summary.csv", index_col=0)
    assert len(summary) == 85
    # partial pooling pulls the county intercepts together: less spread than no pooling,
    # and every county with one or two homes ends closer to the county-level regression
    assert summary.partial_pooling.std() < 0.8 * summary.no_pooling.std()
    small = summary[summary.n_obs <= 2]
    assert len(small) > 5
    to_regression = (small.partial_pooling - small.county_regression).abs()
    assert np.all(to_regression < (small.no_pooling - small.county_regression).abs())


def test_mnist_job_runs_and_its_outputs_agree(tmp_path):
    pytest.importorskip("flax")
    from hierfl.neural import load_neural_fit

    stream = io.StringIO()
    job = run_mnist(
        tmp_path,
        num_clients=4,
        num_rounds=2,
        local_steps=2,
        num_examples=400,
        stream=stream,
    )
    assert "hierfl mnist: 4 clients (dirichlet_0.5)" in stream.getvalue()
    summary, clients = job["summary"], job["clients"]
    assert list(summary.index) == ["hierfl", "local", "fedavg", "fedavg_ft"]
    for name in summary.index:  # the summary's mean is the mean of the per-client accuracies
        assert summary.loc[name, "acc_mean"] == pytest.approx(clients[f"acc_{name}"].mean())
    assert np.all(summary[["nll", "ece"]].to_numpy() > 0)
    written = pd.read_csv(job["paths"]["clients"], index_col=0)
    np.testing.assert_allclose(written.to_numpy(), clients.to_numpy())
    for path in job["paths"].values():
        assert path.stat().st_size > 0, path
    loaded = load_neural_fit(job["paths"]["fit"])
    x = np.zeros((3, 784))
    np.testing.assert_allclose(
        loaded.predict(0, x=x, key=1)["probs"], job["fit"].predict(0, x=x, key=1)["probs"]
    )


def test_mnist_job_names_its_models(tmp_path):
    pytest.importorskip("flax")
    from hierfl.cli import MNIST_MODELS
    from models import mnist_heads

    for name in MNIST_MODELS.values():  # every choice of --model is a model of the zoo
        assert getattr(mnist_heads, name)().name == name
    with pytest.raises(ValueError, match="model must be 'auto' or one of"):
        run_mnist(tmp_path, num_clients=3, num_examples=300, model="lora", stream=io.StringIO())


@pytest.mark.slow
def test_radon_job_on_flower_gives_the_in_process_intercepts(tmp_path, capsys):
    pytest.importorskip("ray")
    common = ["--num-samples", "300", "--num-warmup", "300", "--num-chains", "2"]
    assert main(["radon", "--out", str(tmp_path / "simulate")] + common) == 0
    assert main(["radon", "--out", str(tmp_path / "flower"), "--driver", "flower"] + common) == 0
    assert "on Flower (one SuperNode per county)" in capsys.readouterr().out
    ours = pd.read_csv(tmp_path / "flower" / "county_summary.csv", index_col=0)
    theirs = pd.read_csv(tmp_path / "simulate" / "county_summary.csv", index_col=0)
    # same statistics and keys: the intercepts agree to Monte Carlo error
    gap = (ours.partial_pooling - theirs.partial_pooling).abs() / theirs.partial_sd
    assert gap.max() < 0.25
