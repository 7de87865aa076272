"""mnist_gan's Fréchet distance in a digit classifier's feature space (the function, the cached
classifier, a real run, sharded evaluation), and the GAN presets' report on a real tiny sweep."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import scipy.linalg
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from conftest import GENRUN, scored_in_shares
from genrun.gan_models import DCGAN
from genrun.tasks import frechet
from genrun.tasks.gan import MnistGan
from test_gan import TINY, _records

FAST_FD = ["task.fd_epochs=1", "task.fd_width=4"]  # a classifier that trains in a second


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root, for comparison."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross))


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    assert frechet.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifts = [frechet.frechet_distance(a, a + shift) for shift in (0.1, 0.5, 1.0)]
    assert shifts == pytest.approx([8 * 0.1 ** 2, 8 * 0.5 ** 2, 8.0])  # same covariance: |mu_a - mu_b|^2
    b = rng.normal(size=(400, 8)) * 2 + 1
    assert frechet.frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-6)
    with pytest.raises(ValueError, match="n >= 2"):
        frechet.frechet_distance(a[:1], b)


def _digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def test_the_classifier_is_cached_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    images, labels = _digits()
    first = frechet.classifier(images, labels, tmp_path, width=4, epochs=1)
    [path] = tmp_path.glob("digit-features-*.pt")
    stamp, content = path.stat().st_mtime_ns, path.read_bytes()

    def no_training(*_, **__):
        raise AssertionError("trained again despite the cache")

    train = frechet.train
    monkeypatch.setattr(frechet, "train", no_training)
    again = frechet.classifier(images, labels, tmp_path, width=4, epochs=1)
    assert path.stat().st_mtime_ns == stamp and path.read_bytes() == content
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))

    monkeypatch.setattr(frechet, "train", train)
    path.write_bytes(content[: len(content) // 2])  # cut off, as a full disk would leave it
    rebuilt = frechet.classifier(images, labels, tmp_path, width=4, epochs=1)
    assert path.read_bytes() == content  # trained again, and deterministically the same weights
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), rebuilt.state_dict().values()))
    assert torch.load(path, weights_only=True)["format"] == frechet.FORMAT
    other = frechet.classifier(images, labels, tmp_path, width=4, epochs=2)  # another recipe: another file
    assert len(list(tmp_path.glob("digit-features-*.pt"))) == 2 and other is not None


def test_sharded_evaluation_gathers_features_to_one_processs_fd(tmp_path):
    task = MnistGan(fd_width=4, fd_epochs=1, feature_cache=str(tmp_path))
    _, evals = task.datasets()
    model = DCGAN(32, 1, ngf=8, ndf=8).eval()

    shared, whole = scored_in_shares(task, model, evals["test"], count=3, batch_size=300)
    assert whole["fd"] > 0 and shared["fd"] == pytest.approx(whole["fd"], rel=1e-9)
    assert shared == pytest.approx(whole, rel=1e-6)  # the other sums are float32 batch sums, in another order
    without = MnistGan(fd=False)
    without.datasets()
    assert "fd" not in without.score([without.predict(model, DataLoader(evals["test"], batch_size=500), lambda b: b)])


def test_a_tiny_mnist_gan_run_reports_fd(genrun, tmp_path):
    run = tmp_path / "run"
    proc = genrun(*TINY, *FAST_FD, "optim=gen_adam", "trainer.max_steps=4", "trainer.eval_every=2",
                  f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    evals = [r for r in _records(run, "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(r["fd"] > 0 for r in evals)
    assert json.loads((run / "summary.json").read_text())["final"]["test"]["fd"] == evals[-1]["fd"]


def test_gan_presets_are_the_tutorials_setting(compose_cfg):
    offline = compose_cfg(["+experiment=gan_offline"])
    assert offline.task.name == "mnist_gan" and offline.trainer.batch_size == 128 and offline.trainer.epochs == 5
    assert offline.gan.row == "gen" and offline.optim.gen.horizon == "none" and offline.optim.lr == 2e-4
    assert list(offline.optim.betas) == [0.5, 0.999]
    lrs = {row: compose_cfg(["+experiment=gan_offline", f"experiment/gan_row={row}"]).optim.lr
           for row in ("adam", "adam_x10", "adam_div10")}
    assert lrs == {"adam": 2e-4, "adam_x10": 2e-3, "adam_div10": 2e-5}
    celeba = compose_cfg(["+experiment=gan", "experiment/gan_row=adam"])
    assert celeba.task.name == "celeba" and celeba.task.image_size == 64 and celeba.optim.name == "adam"
    assert isinstance(instantiate(offline.task, fd=False), MnistGan)


def test_gan_offline_sweep_and_its_report(genrun, tmp_path):
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "+experiment=gan_offline", "experiment/gan_row=gen,adam", "hydra/launcher=basic", "seed=0",
                  "trainer.max_steps=3", "model.ngf=8", "model.ndf=8", "trainer.batch_size=32", *FAST_FD,
                  f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    report = subprocess.run([str(GENRUN.with_name("genrun-report")), str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    table = (sweep / "gan.md").read_text()
    assert "not FID" in table and "| GeN-Adam | 1 |" in table and "| Adam 2e-4 (tutorial) | 1 |" in table
    line = next(x for x in table.splitlines() if x.startswith("| Adam 2e-4"))
    final = json.loads(next(p for p in sweep.glob("*/summary.json")
                            if "adam" in (p.parent / ".hydra" / "overrides.yaml").read_text()
                            and "gan_row=gen" not in (p.parent / ".hydra" / "overrides.yaml").read_text()
                            ).read_text())["final"]["test"]
    cells = [c.strip() for c in line.split("|")[3:-1]]
    assert float(cells[0]) == pytest.approx(final["fd"], abs=6e-4)
    assert float(cells[-1]) == pytest.approx(2e-4) and float(cells[-2]) == pytest.approx(2e-4)
    assert (sweep / "gan_curves.png").stat().st_size > 10_000
    assert (sweep / "gan_samples.png").stat().st_size > 10_000


def test_a_celeba_sweeps_table_reports_fid_and_says_what_it_is(tmp_path):
    from omegaconf import OmegaConf

    from genrun.report import gan
    from genrun.report.runs import Run

    def run(row: str, seed: int, fid: float) -> Run:
        cfg = OmegaConf.create({"task": {"name": "celeba"}, "gan": {"row": row}, "seed": seed})
        final = {"test": {"fid": fid, "D(x)": 0.5, "D(G(z))": 0.4, "loss/D": 1.0, "loss/G": 2.0}}
        return Run(tmp_path / f"{row}{seed}", cfg, {"status": "finished", "final": final})

    rows = gan.collect([run("gen", 0, 30.0), run("gen", 1, 40.0), run("adam", 0, 50.0)])
    table = gan.render_markdown(rows)
    assert "| row | seeds | fid | D(x) |" in table and "Inception" in table and "`fd`" not in table
    assert "| GeN-Adam | 2 | 35.000 ±5.000 |" in table and "| Adam 2e-4 (tutorial) | 1 | 50.000 |" in table
