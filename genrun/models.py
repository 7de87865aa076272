"""Models: a small CNN for the offline tasks; torchvision ResNets and timm ViTs for the paper's vision
runs; torchvision's Mask R-CNN for detection; BERT4Rec. The Hugging Face text models (classifier,
causal LM) are in `genrun.text_models`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from genrun.errors import UserError


class SmallCNN(nn.Module):
    """conv(32)-conv(64)-maxpool-fc(128)-fc(classes), ReLU; any input side >= 2.

    The adaptive pool to 4x4 lets the same network take 8x8 digits and 28x28 MNIST.
    `batchnorm` adds BatchNorm after each conv; `dropout` applies before the last layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        hidden: int = 128,
        batchnorm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(c_out)] if batchnorm else []
            return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU()]

        self.features = nn.Sequential(
            *conv(in_channels, width),
            *conv(width, 2 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))



# -- torchvision ResNets and timm ViTs (paper B.2: ImageNet-pretrained, fine-tuned) ------------
#
# `pretrained` is false (random init), true (the library's own download: torchvision's
# ImageNet weights, timm's Hugging Face weights; offline this fails with a one-line UserError),
# or the path of a local state_dict file (read with weights_only=True). With pretrained
# weights, a head whose class count differs from `num_classes` is replaced by a fresh one, and
# a first conv made for 3 channels is summed over its input channels when `in_channels` is 1
# (timm's rule), so the offline 1-channel tasks need no channel copying in the data.

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet152")
VITS = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
}


def _offline_hint(what: str, err: Exception) -> UserError:
    reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return UserError(
        f"model.pretrained=true: could not download the {what} weights ({type(err).__name__}: {reason}); "
        f"without internet, save a state_dict on a machine that has it and pass model.pretrained=/path/to/weights.pt"
    )


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A local weights file: a state_dict, or a checkpoint holding one under 'state_dict' or 'model'."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"model.pretrained={path}: no such file; "
                        "pass a state_dict saved with torch.save, true or false")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-tensor objects
        raise UserError(f"model.pretrained={path}: not a readable weights file ({type(err).__name__})") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.pretrained={path}: expected a state_dict (name -> tensor)")
    return state


def _adapt_in_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A 3-channel first conv for `in_channels` inputs: summed for 1 channel, tiled and rescaled otherwise."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], head: str, first_conv: str, source: str) -> None:
    """Load `state` into `model`, replacing a head of another class count; other mismatches are errors."""
    own = model.state_dict()
    if first_conv in state and first_conv in own:
        state[first_conv] = _adapt_in_channels(state[first_conv], own[first_conv].shape[1])
    for key in [k for k in state if k.startswith(head + ".")]:
        if key in own and state[key].shape != own[key].shape:
            state[key] = own[key]  # a new head: keep the fresh initialisation
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if bad or missing or unexpected:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("wrong shape", bad), ("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise UserError(f"model.pretrained={source}: weights do not fit {type(model).__name__} ({detail})")
    model.load_state_dict(state)


def resnet(
    arch: str = "resnet50",
    num_classes: int = 10,
    in_channels: int = 3,
    pretrained: bool | str = False,
) -> nn.Module:
    """A torchvision ResNet (18/34/50/152) with a `num_classes` head and `in_channels` inputs."""
    import torchvision

    if arch not in RESNETS:
        raise UserError(f"model.arch={arch} is not one of {', '.join(RESNETS)}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if pretrained is True:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as err:  # URLError, socket errors, HTTP errors: all mean "could not fetch"
            raise _offline_hint(f"torchvision {arch}", err) from err
        _load_into(model, dict(state), "fc", "conv1.weight", "true")
    elif pretrained not in (False, None):
        _load_into(model, _read_state_dict(pretrained), "fc", "conv1.weight", str(pretrained))
    return model


def vit(
    arch: str = "vit_base",
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 224,
    pretrained: bool | str = False,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A timm ViT (tiny/small/base/large, patch 16) for `image_size` inputs.

    Position embeddings are resampled for other sizes and inputs whose side is not a multiple
    of 16 are padded (timm's dynamic_img_size/pad), so 8x8 digits and 28x28 MNIST run too.
    """
    import timm

    if arch not in VITS:
        raise UserError(f"model.arch={arch} is not one of {', '.join(VITS)}")
    kwargs: dict[str, Any] = dict(
        num_classes=num_classes, in_chans=in_channels, img_size=image_size,
        dynamic_img_size=True, dynamic_img_pad=True, drop_path_rate=drop_path_rate,
    )
    if pretrained in (False, None):
        return timm.create_model(VITS[arch], pretrained=False, **kwargs)
    if pretrained is True:
        try:
            return timm.create_model(VITS[arch], pretrained=True, **kwargs)
        except Exception as err:  # hub/HTTP/offline errors
            raise _offline_hint(f"timm {VITS[arch]}", err) from err
    model = timm.create_model(VITS[arch], pretrained=False, **kwargs)
    state = _read_state_dict(pretrained)
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=1)
    _load_into(model, state, "head", "patch_embed.proj.weight", str(pretrained))
    return model


# -- detection and segmentation (genrun.tasks.detection) ----------------------------------------


MASK_RCNN_BACKBONES = ("resnet18", "resnet34", "resnet50")


def mask_rcnn(
    num_categories: int,
    backbone: str = "resnet50",
    pretrained: bool | str = False,
    min_size: int = 800,
    max_size: int = 1333,
    box_features: int = 1024,
    rpn_samples: int = 256,
    box_samples: int = 512,
) -> nn.Module:
    """torchvision's Mask R-CNN (ResNet-FPN) with box and mask predictors for `num_categories` + background.

    `pretrained`: true loads torchvision's COCO weights (ResNet-50 only; needs internet), a path
    loads a state_dict of that COCO model; either way the two predictors are then replaced by
    fresh ones for this task's categories, as torchvision's detection tutorial does. Without
    pretrained weights the backbone's BatchNorm trains (frozen statistics of an untrained
    network would be meaningless). `box_features` is the width of the box head's two layers;
    `min_size`/`max_size` bound the image side the model resizes to; `rpn_samples` and
    `box_samples` are the anchors and proposals sampled per image for the losses (torchvision's
    256 and 512; on a CPU with few objects per image, 64 each cut a step's time severalfold).
    """
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    if backbone not in MASK_RCNN_BACKBONES:
        raise UserError(f"model.backbone={backbone} is not one of {', '.join(MASK_RCNN_BACKBONES)}")
    classes = num_categories + 1
    if pretrained not in (False, None):
        if backbone != "resnet50":
            raise UserError(f"model.pretrained={pretrained}: COCO weights exist for backbone=resnet50 only")
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=min_size, max_size=max_size,
                                      rpn_batch_size_per_image=rpn_samples, box_batch_size_per_image=box_samples)
        if pretrained is True:
            from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

            try:
                state = MaskRCNN_ResNet50_FPN_Weights.DEFAULT.get_state_dict(progress=False)
            except Exception as err:  # URLError, socket errors, HTTP errors: all mean "could not fetch"
                raise _offline_hint("torchvision Mask R-CNN COCO", err) from err
        else:
            state = _read_state_dict(pretrained)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"model.pretrained={pretrained}: not a Mask R-CNN ResNet-50 FPN state_dict "
                            f"({str(err).splitlines()[0][:120]})") from None
        model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_head.fc7.out_features, classes)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(256, 256, classes)
        return model
    features = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5)
    resolution = 7  # the box RoI pooling's output side
    return MaskRCNN(features, min_size=min_size, max_size=max_size, rpn_batch_size_per_image=rpn_samples,
                    box_batch_size_per_image=box_samples,
                    box_head=TwoMLPHead(features.out_channels * resolution ** 2, box_features),
                    box_predictor=FastRCNNPredictor(box_features, classes),
                    mask_predictor=MaskRCNNPredictor(256, 256, classes))


# -- sequential recommendation (genrun.tasks.recsys) -------------------------------------------


class BERT4Rec(nn.Module):
    """BERT4Rec (Sun et al., 2019): a bidirectional Transformer encoder over item ids.

    Token ids: 0 pads, 1..num_items are items, num_items + 1 is the mask token. The encoder
    is BERT's (post-norm, GELU, learned positions, LayerNorm and dropout on the embeddings,
    truncated N(0, 0.02) embeddings and weights, attention's fused query/key/value projection
    included), built from torch's own ``nn.TransformerEncoder``; the output
    layer is BERT's masked-LM head, a dense-GELU-LayerNorm transform scored against the
    (shared) item embeddings plus a bias per item. Defaults are the authors' MovieLens-1M
    settings: d = 64, 2 layers, 2 heads, feed-forward 4d, dropout 0.2, 200 positions.
    """

    def __init__(self, num_items: int, max_len: int = 200, hidden: int = 64, layers: int = 2, heads: int = 2,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if hidden % heads:
            raise UserError(f"model.hidden={hidden} must be a multiple of model.heads={heads}")
        self.num_items = num_items
        self.items = nn.Embedding(num_items + 2, hidden, padding_idx=0)
        self.positions = nn.Embedding(max_len, hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout, activation="gelu",
                                           layer_norm_eps=1e-12, batch_first=True)
        # no nested-tensor fast path: evaluation then runs the same kernels as training
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        self.bias = nn.Parameter(torch.zeros(num_items))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.MultiheadAttention):  # its q/k/v weights are one Parameter, not a Linear
                nn.init.trunc_normal_(module.in_proj_weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(module.in_proj_bias)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, tokens: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, L, hidden]`` of token ids ``[B, L]`` (left-padded with 0); with a
        boolean mask ``at`` ``[B, L]``, the item scores at those positions instead (the training
        loss goes through forward, so that DDP sees every parameter it uses)."""
        if tokens.shape[1] > self.positions.num_embeddings:
            raise UserError(f"a sequence of {tokens.shape[1]} tokens exceeds model.max_len="
                            f"{self.positions.num_embeddings}; set model.max_len >= task.max_len")
        x = self.items(tokens) + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        hidden = self.encoder(self.dropout(self.embed_norm(x)), src_key_padding_mask=tokens == 0)
        return hidden if at is None else self.item_logits(hidden[at])

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores ``[..., num_items]`` of items 1..num_items at the given hidden states."""
        return self.transform(hidden) @ self.items.weight[1:self.num_items + 1].T + self.bias
