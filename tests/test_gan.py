"""Image generation: a GAN's two players (Task.objectives) trained in turn, GeN on each, through the
one training loop: records, samples, resume, two processes and divergence, on real MNIST digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from genrun.errors import UserError
from genrun.gan_models import DCGAN

TINY = ["task=mnist_gan", "model.ngf=8", "model.ndf=8", "trainer.batch_size=32", "trainer.eval_batch_size=500",
        "trainer.progress=off", "logger=none"]
GRID = 8 * 32 + 9 * 2  # 64 samples of 32 px, 8 a row, save_image's 2-px padding


def _records(run_dir: Path, name: str) -> list[dict]:
    """A run's records without their wall-clock seconds, which no two runs share."""
    rows = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("time_s", "eval_s")} for row in rows]


def _run(genrun, run_dir: Path, *args: str, code: int = 0, **kwargs) -> dict:
    proc = genrun(*TINY, *args, f"hydra.run.dir={run_dir}", **kwargs)
    assert proc.returncode == code, proc.stderr
    return json.loads((run_dir / "summary.json").read_text())


def test_gen_adam_trains_both_players_and_writes_samples(genrun, tmp_path):
    run = tmp_path / "run"
    summary = _run(genrun, run, "optim=gen_adam", "optim.gen.every=2", "trainer.max_steps=8", "trainer.eval_every=4")
    assert summary["status"] == "finished" and summary["step"] == 8
    assert set(summary["gen"]["players"]) == {"D", "G"}
    train = [r for r in _records(run, "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    for r in train:  # `loss` is the players' sum; `lr` every param group of D, then of G
        assert r["loss"] == pytest.approx(r["loss/D"] + r["loss/G"])
        assert r["lr"][0] == r["lr/D"] and r["lr"][-1] == r["lr/G"]
    probes = _records(run, "gen.jsonl")
    assert {p["player"] for p in probes} == {"D", "G"}
    assert sorted((p["player"], p["step"]) for p in probes) == [(who, t) for who in "DG" for t in (0, 2, 4, 6)]
    evals = [r for r in _records(run, "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert 0 < r["D(x)"] < 1 and 0 < r["D(G(z))"] < 1 and r["loss/D"] > 0 and r["loss/G"] > 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step4.png", "step8.png"]
    for png in (run / "samples").iterdir():
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (GRID, GRID)


def test_each_evaluations_samples_go_to_wandb_as_images(genrun, tmp_path):
    run = tmp_path / "run"
    proc = genrun(*[a for a in TINY if a != "logger=none"], "logger=wandb", "optim=adam", "trainer.max_steps=4",
                  "trainer.eval_every=2", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    shown = sorted(run.glob("wandb/offline-run-*/files/media/images/images/samples_*.png"))
    assert len(shown) == 2  # steps 2 and 4, each the grid written to samples/
    with Image.open(shown[-1]) as image:
        assert image.size == (GRID, GRID)


def test_adam_on_both_players_trains_without_gen(genrun, tmp_path):
    run = tmp_path / "run"
    summary = _run(genrun, run, "optim=adam", "optim.lr=2e-4", "optim.betas=[0.5,0.999]", "trainer.max_steps=4")
    assert summary["status"] == "finished" and summary["gen"] is None
    train = [r for r in _records(run, "metrics.jsonl") if r["kind"] == "train"]
    assert all(r["lr/D"] == r["lr/G"] == 2e-4 for r in train)
    assert not (run / "gen.jsonl").exists() or not (run / "gen.jsonl").read_text()
    assert (run / "samples" / "step4.png").is_file()


# the process dies right after writing its step-4 checkpoint, as a kill would leave it
KILLED_AFTER_STEP_4 = """
import os, signal
import genrun.checkpoint as checkpoint
_save = checkpoint.save
def save(path, state):
    _save(path, state)
    if state["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save
"""


def test_killed_and_resumed_gan_matches_an_uninterrupted_run(genrun, tmp_path):
    args = ["optim=gen_adam", "optim.gen.every=2", "trainer.max_steps=10", "trainer.ckpt_every=4",
            "trainer.eval_every=5", "seed=3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _run(genrun, straight, *args)
    proc = genrun(*TINY, *args, f"hydra.run.dir={stopped}", python=KILLED_AFTER_STEP_4)
    assert proc.returncode != 0 and not (stopped / "summary.json").exists()
    state = torch.load(stopped / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and set(state["optimizer"]) == set(state["gen"]) == {"D", "G"}

    proc = genrun(f"trainer.resume={stopped}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((stopped / "summary.json").read_text())["status"] == "finished"
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, stopped))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for name in ("metrics.jsonl", "gen.jsonl"):
        assert _records(straight, name) == _records(stopped, name)
    assert (straight / "samples" / "step10.png").read_bytes() == (stopped / "samples" / "step10.png").read_bytes()


def test_two_processes_train_the_gan(genrun, tmp_path):
    run = tmp_path / "run"
    summary = _run(genrun, run, "optim=gen_adam", "optim.gen.every=2", "trainer.max_steps=4", "trainer.devices=2")
    assert summary["status"] == "finished" and summary["devices"] == 2 and summary["step"] == 4
    train = [r for r in _records(run, "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # process 0 writes, each step once
    assert {p["player"] for p in _records(run, "gen.jsonl")} == {"D", "G"}
    assert (run / "samples" / "step4.png").is_file()


# the generator's loss turns NaN from its 6th training forward on (probes run without a graph)
G_NAN_FROM_STEP_6 = """
import torch
from genrun.tasks.gan import GanTask
_g_loss, calls = GanTask.g_loss, [0]
def g_loss(self, model, batch):
    loss = _g_loss(self, model, batch)
    if torch.is_grad_enabled():
        calls[0] += 1
    return loss * float("nan") if calls[0] >= 6 else loss
GanTask.g_loss = g_loss
"""


def test_a_non_finite_loss_of_one_player_stops_the_run_with_the_last_good_checkpoint(genrun, tmp_path):
    run = tmp_path / "run"
    summary = _run(genrun, run, "optim=gen_adam", "trainer.max_steps=10", "trainer.ckpt_every=2",
                   code=3, python=G_NAN_FROM_STEP_6)  # 3: diverged
    assert summary["status"] == "diverged" and summary["step"] == 5
    assert "loss is nan at step 6" in summary["message"] and "(step 4) is kept" in summary["message"]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 4
    assert [r["step"] for r in _records(run, "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4, 5]


def test_dcgan_has_the_tutorials_layers_at_64_px_and_one_fewer_at_32():
    def convs(net):
        return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in net.modules())

    big, small = DCGAN(64, 3), DCGAN(32, 1)
    assert convs(big.generator) == convs(big.discriminator) == 5
    assert convs(small.generator) == convs(small.discriminator) == 4
    real, fake = big(torch.randn(2, 100, 1, 1), torch.randn(2, 3, 64, 64))
    assert real.shape == fake.shape == (2,)
    assert big.generator(torch.randn(2, 100, 1, 1)).shape == (2, 3, 64, 64)
    with pytest.raises(UserError, match="power of two"):
        DCGAN(48, 1)


def test_each_gen_probes_its_own_players_loss_with_the_noise_of_its_forward(compose_cfg):
    from hydra.utils import instantiate

    from genrun.step import Stepper

    cfg = compose_cfg(["task=mnist_gan", "optim=gen_adam", "model.ngf=8", "model.ndf=8"])
    task, model = instantiate(cfg.task), instantiate(cfg.model)
    stepper = Stepper.build(cfg, task, model, model, torch.device("cpu"), total_steps=4, world=1)
    for player, module in zip(stepper.players, (model.discriminator, model.generator)):
        trained = {id(p) for group in player.optimizer.param_groups for p in group["params"]}
        assert trained == {id(p) for p in module.parameters()}
    seen: list[torch.Tensor] = []
    model.generator.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    micro = [task.datasets()[0][:16]]
    stepper.backward(micro)  # D's forward, D's probes (and its step), then G's forward
    stepper.step(micro)      # G's probes and step
    d_turn, g_turn = seen[0], seen[-1]
    assert not torch.equal(d_turn, g_turn) and len(seen) > 2  # probes ran
    # D's forward and every probe of D's GeN see one z; G's forward and every probe of G's GeN another
    switch = next(i for i, z in enumerate(seen) if not torch.equal(z, d_turn))
    assert all(torch.equal(z, g_turn) for z in seen[switch:]) and switch > 1 and len(seen) - switch > 1
    assert [(p.name, len(p.gen.history)) for p in stepper.players] == [("D", 1), ("G", 1)]


def _celeba(root: Path, train: int, test: int) -> None:
    """A few faces in CelebA's published layout: 178 x 218 JPEGs and the partition list."""
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    lines = []
    for i, split in enumerate([0] * train + [1] * 2 + [2] * test, 1):
        pixels = torch.randint(0, 256, (218, 178, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg")
        lines.append(f"{i:06d}.jpg {split}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """FID's Inception-v3 in torch-fidelity's file format with random weights (the real ones are a
    download): the network, its loading and the distance are the real code; only the numbers are not FID's."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as extractor
    from torchmetrics.image.fid import NoTrainInceptionV3

    torch.manual_seed(0)
    with mock.patch.object(extractor, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, state, strict=True: None):
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    path = tmp_path_factory.mktemp("inception") / "weights-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_celeba_trains_on_faces_in_the_published_layout_and_scores_fid(genrun, tmp_path, inception_file):
    _celeba(tmp_path / "data", train=16, test=4)
    run = tmp_path / "run"
    summary = _run(genrun, run, "task=celeba", f"task.data_dir={tmp_path / 'data'}", "optim=gen_adam",
                   f"task.fid_weights={inception_file}", "trainer.batch_size=8", "trainer.max_steps=2",
                   "trainer.num_workers=0")
    final = summary["final"]["test"]
    assert summary["status"] == "finished" and set(final) >= {"D(x)", "D(G(z))", "fid"} and "fd" not in final
    assert 0 < final["fid"] < float("inf")
    with Image.open(run / "samples" / "step2.png") as image:
        assert image.size == (8 * 64 + 9 * 2,) * 2 and image.mode == "RGB"


def test_fid_features_see_images_in_minus_one_to_one_as_8_bit_pixels(inception_file):
    from genrun.tasks.frechet import frechet_distance, inception

    features = inception(inception_file)
    levels = torch.randint(0, 256, (3, 3, 40, 40), generator=torch.Generator().manual_seed(1))
    faces = levels / 127.5 - 1  # on the 8-bit grid
    same = features.features(faces)
    assert same.shape == (3, 2048)
    # under half a grey level apart, the same 8-bit image; out of range, clipped as a saved image is
    assert torch.equal(features.features((faces + 0.001).clamp(-1, 1)), same)
    assert torch.equal(features.features(faces * 1e3), features.features(faces.sign()))
    digits = faces[:, :1]  # one channel: grey, as three equal channels
    assert torch.equal(features.features(digits), features.features(digits.expand(-1, 3, -1, -1)))
    assert frechet_distance(same, same) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(same, features.features(-faces)) > 0


def test_fid_weights_missing_or_damaged_is_one_line(genrun, tmp_path):
    _celeba(tmp_path / "data", train=4, test=2)
    absent, damaged = tmp_path / "none.pth", tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a checkpoint")
    for weights, words in ((absent, ("task.download=true", "task.fid=false")), (damaged, ("delete it",))):
        run = tmp_path / f"run_{weights.stem}"
        proc = genrun(*TINY, "task=celeba", f"task.data_dir={tmp_path / 'data'}", f"task.fid_weights={weights}",
                      "trainer.num_workers=0", f"hydra.run.dir={run}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("genrun: error: task.fid_weights") and str(weights) in line
        assert all(word in line for word in words), line
        assert not run.exists()
    assert damaged.read_bytes() == b"not a checkpoint"  # a user's file is never removed or replaced


def test_celeba_missing_is_one_line_naming_the_path_and_the_flag(genrun, tmp_path):
    proc = genrun("task=celeba", f"task.data_dir={tmp_path / 'none'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert str(tmp_path / "none" / "celeba") in line and "task.download=true" in line
