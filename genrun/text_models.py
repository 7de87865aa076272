"""Hugging Face text models: an encoder with a classification head (NLU) and a causal language
model (NLG). Both take ``model.finetune``, which picks what trains, as in the paper's Tables 3-4:

- ``full``: every weight;
- ``bitfit``: the biases and the head (Zaken et al., 2022);
- ``lora``: rank-``lora_r`` adapters through peft (Hu et al., 2022: W + (α/r)·BA, B = 0 at the
  start) on the attention's projections, plus a classifier's head.

Frozen weights have ``requires_grad=False``, so optimizers and GeN never see them.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from genrun.errors import UserError

FINETUNE = ("full", "bitfit", "lora")


def _check_finetune(finetune: str) -> None:
    if finetune not in FINETUNE:
        raise UserError(f"model.finetune={finetune} is invalid: must be one of {', '.join(FINETUNE)}")


def _bitfit(net: nn.Module, head: str | None) -> None:
    """Train only the biases (and, for a classifier, the head under prefix `head`)."""
    for name, param in net.named_parameters():
        param.requires_grad_(name.endswith(".bias") or (head is not None and name.startswith(head)))


def _lora(net: nn.Module, task_type: str, targets: list[str] | None, r: int, alpha: float, dropout: float) -> nn.Module:
    """`net` with peft's LoRA adapters on `targets` (None: peft's default for the architecture)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # GPT-2's projections are Conv1D, a Linear with its weight transposed: peft must be told
    transposed = any(isinstance(m, Conv1D) for m in net.modules())
    config = LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        fan_in_fan_out=transposed)
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5: not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(net, config)


class TextClassifier(nn.Module):
    """A pretrained encoder with a fresh head: ``model(**tokens)`` returns logits ``[B, num_labels]``.

    LoRA adapts the attention's query and value projections and trains the head.
    ``num_labels`` = 1 makes a regression head (STS-B).
    """

    def __init__(self, pretrained: str, num_labels: int, finetune: str = "full", lora_r: int = 8,
                 lora_alpha: float = 16.0, lora_dropout: float = 0.1) -> None:
        super().__init__()
        from genrun.hf import load_classifier

        _check_finetune(finetune)
        net = load_classifier(pretrained, num_labels)
        if finetune == "bitfit":
            _bitfit(net, _head_prefix(net))
        elif finetune == "lora":
            net = _lora(net, "SEQ_CLS", ["query", "value"], lora_r, lora_alpha, lora_dropout)
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def _head_prefix(net: nn.Module) -> str:
    """The classification head's parameter prefix: what lies outside the encoder (`net.base_model_prefix`)."""
    encoder = net.base_model_prefix + "."
    heads = {name.split(".")[0] for name, _ in net.named_parameters() if not name.startswith(encoder)}
    if len(heads) != 1:
        raise UserError(f"model.finetune=bitfit: cannot tell the head of {type(net).__name__} ({sorted(heads)})")
    return heads.pop() + "."


class CausalLM(nn.Module):
    """A decoder-only language model: ``model(input_ids, attention_mask)`` returns next-token
    logits ``[B, T, vocab]``; ``model.generate(...)`` is transformers' decoding.

    ``pretrained`` names a checkpoint (``gpt2``, a directory saved with ``save_pretrained``);
    ``None`` builds a GPT-2 of ``layers`` x ``width`` (``heads`` heads, ``positions`` tokens)
    from scratch, with the vocabulary of ``tokenizer``. LoRA adapts peft's default projections
    for the architecture (GPT-2: the fused ``c_attn``, as in Hu et al.'s E2E runs).
    ``max_length`` + ``max_new_tokens`` (the task's training and decoding lengths) must fit the
    model's positions.
    """

    def __init__(self, max_length: int, max_new_tokens: int, pretrained: str | None = None,
                 tokenizer: str | None = None, finetune: str = "full", lora_r: int = 4, lora_alpha: float = 32.0,
                 lora_dropout: float = 0.1, layers: int = 2, width: int = 128, heads: int = 4,
                 positions: int = 192) -> None:
        super().__init__()
        from genrun.hf import load_causal_lm, load_tokenizer

        _check_finetune(finetune)
        if pretrained is None:
            if finetune != "full":
                raise UserError(f"model.finetune={finetune} needs pretrained weights (model.pretrained); "
                                "a network from scratch trains fully")
            if tokenizer is None:
                raise UserError("model.tokenizer is missing: a model from scratch (model.pretrained=null) "
                                "takes its vocabulary from a tokenizer")
            if width % heads:
                raise UserError(f"model.width={width} is not a multiple of model.heads={heads}")
            from transformers import GPT2Config, GPT2LMHeadModel

            vocab = load_tokenizer(tokenizer, key="model.tokenizer")
            net = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=positions, n_embd=width,
                                             n_layer=layers, n_head=heads))
        else:
            net = load_causal_lm(pretrained)
            if finetune == "bitfit":
                _bitfit(net, None)
            elif finetune == "lora":
                net = _lora(net, "CAUSAL_LM", None, lora_r, lora_alpha, lora_dropout)
        room = getattr(net.config, "n_positions", None) or getattr(net.config, "max_position_embeddings", None)
        if room is not None and max_length + max_new_tokens > room:
            raise UserError(f"task.max_length + task.max_new_tokens = {max_length + max_new_tokens} exceeds "
                            f"the model's {room} positions: lower them"
                            + (" or raise model.positions" if pretrained is None else ""))
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Prompt + continuation ids ``[B, T + new]`` (prompts padded on the left)."""
        return self.net.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
