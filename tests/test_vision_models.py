"""ResNets (torchvision) and ViTs (timm): heads, channels, local weights files, and offline `pretrained=true`."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch

from genrun.errors import UserError
from genrun.models import resnet, vit


def test_resnet_and_vit_take_3_channel_images_of_any_size():
    assert resnet("resnet18", num_classes=7)(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    model = vit("vit_tiny", num_classes=5, image_size=32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    assert model(torch.zeros(2, 3, 20, 20)).shape == (2, 5)  # padded to 32, position embeddings resampled


def test_a_local_resnet_file_loads_with_a_new_head_and_one_channel(tmp_path):
    source = resnet("resnet18", num_classes=1000)
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)
    model = resnet("resnet18", num_classes=10, in_channels=1, pretrained=str(path))
    assert model.fc.weight.shape == (10, 512)
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    # a checkpoint dict with the weights under "state_dict" loads too
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    again = resnet("resnet18", num_classes=1000, pretrained=str(tmp_path / "ckpt.pt"))
    assert torch.equal(again.fc.weight, source.fc.weight)


def test_a_local_vit_file_loads_at_another_image_size(tmp_path):
    source = vit("vit_tiny", num_classes=1000, image_size=224)
    torch.save(source.state_dict(), tmp_path / "vt.pt")
    model = vit("vit_tiny", num_classes=10, image_size=32, pretrained=str(tmp_path / "vt.pt"))
    assert model.head.weight.shape == (10, 192) and model.pos_embed.shape[1] == 1 + 2 * 2
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("make, message", [
    (lambda tmp: resnet("resnet18", pretrained=str(tmp / "absent.pt")), "no such file"),
    (lambda tmp: (tmp / "junk.pt").write_text("not weights") and resnet("resnet18", pretrained=str(tmp / "junk.pt")),
     "not a readable weights file"),
    (lambda tmp: (torch.save(resnet("resnet18").state_dict(), tmp / "r18.pt")
                  or resnet("resnet34", pretrained=str(tmp / "r18.pt"))),
     "weights do not fit ResNet"),
])
def test_a_bad_weights_file_is_one_line(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as err:
        make(tmp_path)
    assert "\n" not in str(err.value)


def _offline(*args, **kwargs):
    raise URLError("[Errno -3] Temporary failure in name resolution")


def test_pretrained_true_offline_fails_clearly_for_torchvision(monkeypatch):
    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url", _offline)
    with pytest.raises(UserError, match=r"model.pretrained=true: could not download the torchvision resnet18") as err:
        resnet("resnet18", num_classes=10, pretrained=True)
    assert "model.pretrained=/path/to/weights.pt" in str(err.value) and "\n" not in str(err.value)


def test_pretrained_true_offline_fails_clearly_for_timm(monkeypatch):
    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_state_dict_from_hf", _offline)
    monkeypatch.setattr(builder, "load_state_dict_from_url", _offline)
    with pytest.raises(UserError, match=r"model.pretrained=true: could not download the timm vit_tiny_patch16_224"):
        vit("vit_tiny", num_classes=10, pretrained=True)


def test_unknown_architecture_is_named():
    with pytest.raises(UserError, match="model.arch=resnet99"):
        resnet("resnet99")
