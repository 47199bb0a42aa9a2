"""Backbones from the model zoos: timm and torchvision models as ``stem / blocks / head``.

    create("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, image_size=24,
           model_args={"patch_size": 4, "depth": 6, "embed_dim": 64, "num_heads": 2})
    create("torchvision:resnet18", num_classes=10, in_channels=1, image_size=24)

The model is built by its library (its own code and keyword arguments; ``model_args`` go to the
constructor as they are) and split without copying its code, in one of two shapes:

* **residual stages** (ResNet, ResNeXt, Wide ResNet; timm's and torchvision's): stem = the first
  convolution, its norm, activation and pooling; blocks = every block of ``layer1..layer4``, a
  downsampling block's shortcut its ``downsample`` projection; head = pooling and classifier.
* **flat transformer blocks** (timm's ViT and DeiT): stem = patch embedding + position embedding
  (and the class and register tokens where the model has them); blocks = the transformer blocks, a
  skipped block the identity on the token sequence; head = final norm, the model's own pooling
  (mean over patches, class token, attention pool), classifier. Between blocks the tokens travel as
  a ``(B, D, H', W')`` grid (a token's features as channels, its patch position as pixels), so the
  environment, the engine, the gates and the observation route a ViT as they route a CNN: a block
  reads ``(B, N, D)`` tokens and writes them back. On small images the model is built without a
  class token and with mean pooling (``class_token=False, global_pool="avg"``: what was measured);
  a model with class or register tokens (``class_token=True global_pool=token reg_tokens=4``)
  carries its N tokens as a ``(B, D, N, 1)`` column instead, prefix tokens first.

Weights are never downloaded unless asked for (``model_args={"pretrained": True}``); a model whose
parts are not found gets an error naming what was looked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from backbones.base import Backbone
from backbones.imagenet_resnet import TorchvisionBlock

SOURCES = ("timm", "torchvision")
# the zoo backbones the tests route (any other model of these shapes works the same way)
TESTED = ("timm:resnet18", "timm:vit_tiny_patch16_224", "torchvision:resnet18")
# a ViT's default patch on small images: a 6x6 grid of patches (24 px -> 4 px patches; 16 px -> 2)
SMALL_IMAGE_GRID = 6


def _tokens(h: Tensor) -> Tensor:
    """A ``(B, D, H, W)`` grid of patch tokens as the ``(B, H*W, D)`` sequence."""
    return h.flatten(2).transpose(1, 2)


def _grid(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """A ``(B, N, D)`` sequence of patch tokens as their ``(B, D, H, W)`` grid."""
    b, _, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, *size)


class PatchStem(nn.Module):
    """A ViT's patch embedding and position embedding (timm's ``_pos_embed``: the class and register
    tokens first, where the model has them), out as the grid of patch tokens, or with prefix tokens
    as the ``(B, D, N, 1)`` column of every token."""

    def __init__(self, vit: Any) -> None:
        super().__init__()
        self.patch_embed, self.pos_embed, self.pos_drop, self.norm_pre = (
            vit.patch_embed, vit.pos_embed, vit.pos_drop, vit.norm_pre
        )  # fmt: skip
        self.cls_token, self.reg_token, self.no_embed_class = vit.cls_token, vit.reg_token, vit.no_embed_class
        grid = tuple(vit.patch_embed.grid_size)
        prefix = vit.num_prefix_tokens
        self.layout: tuple[int, int] = (prefix + grid[0] * grid[1], 1) if prefix else grid

    def forward(self, x: Tensor) -> Tensor:
        # (B, N, D), each token's D values side by side: the blocks read the sequence without a copy, and the grid
        # the blocks pass on is a view of it (channels_last strides)
        tokens = self.patch_embed(x).contiguous()
        prefix = [t.expand(tokens.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is not None and self.no_embed_class:  # the position embedding leaves the prefix out
            tokens = tokens + self.pos_embed
        tokens = torch.cat([*prefix, tokens], dim=1) if prefix else tokens
        if self.pos_embed is not None and not self.no_embed_class:
            tokens = tokens + self.pos_embed
        return _grid(self.norm_pre(self.pos_drop(tokens)), self.layout)


class TokenBlock(nn.Module):
    """A transformer block on the grid of tokens; skipped, the identity."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.shortcut = nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        return _grid(self.block(_tokens(h)), (h.shape[2], h.shape[3]))


class TokenHead(nn.Module):
    """A ViT's final norm, its pooling of the tokens (timm's: mean over patches, the class token, an
    attention pool) and its classifier."""

    def __init__(self, vit: Any) -> None:
        super().__init__()
        self.norm, self.attn_pool, self.fc_norm, self.head_drop, self.head = (
            vit.norm, vit.attn_pool, vit.fc_norm, vit.head_drop, vit.head
        )  # fmt: skip
        self.global_pool, self.num_prefix_tokens = vit.global_pool, vit.num_prefix_tokens
        self.pool_include_prefix = getattr(vit, "pool_include_prefix", False)

    def forward(self, h: Tensor) -> Tensor:
        from timm.layers import global_pool_nlc

        tokens = self.norm(_tokens(h))
        if self.attn_pool is not None:
            pooled = self.attn_pool(tokens if self.pool_include_prefix else tokens[:, self.num_prefix_tokens :])
        else:
            pooled = global_pool_nlc(
                tokens, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens,
                reduce_include_prefix=self.pool_include_prefix,
            )  # fmt: skip
        return self.head(self.head_drop(self.fc_norm(pooled)))


def _timm_model(model: str, num_classes: int, in_channels: int, image_size: int, args: dict[str, Any]) -> Any:
    try:
        import timm
    except ImportError:
        raise ImportError("timm:<model> backbones need timm: pip install timm (the extra .[zoo])") from None
    if model not in timm.list_models() and model not in timm.list_models(pretrained=True):
        raise ValueError(f"timm has no model {model!r} (timm.list_models() lists them)")
    kwargs = {"num_classes": num_classes, "in_chans": in_channels, **args}
    if model.startswith(("vit_", "deit_")):  # a grid of patches: no class token, mean pooling, sized for the data
        patch = max(1, image_size // SMALL_IMAGE_GRID) if image_size < 64 else 16
        kwargs = {"img_size": image_size, "patch_size": patch, "class_token": False, "global_pool": "avg", **kwargs}
    pretrained = bool(kwargs.pop("pretrained", False))
    try:
        return timm.create_model(model, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load timm's pretrained weights for {model}: {err}. Offline, put them in the Hugging Face cache "
            "($HF_HOME) first, or leave pretrained out for a random initialisation."
        ) from err


def _torchvision_model(model: str, num_classes: int, in_channels: int, args: dict[str, Any]) -> Any:
    import torchvision

    if model not in torchvision.models.list_models():
        raise ValueError(f"torchvision has no model {model!r} (torchvision.models.list_models() lists them)")
    weights = args.pop("weights", None)
    if args.pop("pretrained", False):
        weights = "DEFAULT"
    try:
        net = torchvision.models.get_model(model, weights=weights, num_classes=num_classes, **args)
    except (OSError, RuntimeError) as err:
        if weights is None:
            raise
        raise RuntimeError(
            f"could not load torchvision weights {weights!r} for {model}: {err}. Offline, put the weight file in "
            "torchvision's cache ($TORCH_HOME/hub/checkpoints) first, or leave the weights out."
        ) from err
    conv = getattr(net, "conv1", None)
    if isinstance(conv, nn.Conv2d) and conv.in_channels != in_channels:  # torchvision builds for RGB only
        shape: Any = {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding}
        net.conv1 = nn.Conv2d(in_channels, conv.out_channels, bias=False, **shape)
    return net


def split(net: Any, name: str) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """``(stem, blocks, head)`` of a zoo model, or a :class:`ValueError` naming what was looked for."""
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)) and hasattr(net, "fc"):  # residual stages
        act = net.act1 if hasattr(net, "act1") else net.relu  # timm's name, torchvision's
        stem = nn.Sequential(net.conv1, net.bn1, act, net.maxpool)
        blocks: list[nn.Module] = [TorchvisionBlock(b) for i in range(1, 5) for b in getattr(net, f"layer{i}")]
        pool = getattr(net, "global_pool", None)  # timm's pools and flattens; torchvision's average pool does not
        head = nn.Sequential(pool, net.fc) if pool is not None else nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
        return stem, blocks, head
    if hasattr(net, "patch_embed") and hasattr(net, "blocks"):  # flat transformer blocks
        if getattr(net, "dynamic_img_size", False) or not isinstance(net.patch_drop, nn.Identity):
            raise ValueError(f"{name}: dynamic_img_size and patch_drop_rate change the token grid: leave them out")
        return PatchStem(net), [TokenBlock(b) for b in net.blocks], TokenHead(net)
    raise ValueError(
        f"{name}: cannot split this model into stem / blocks / head: looked for residual stages (layer1..layer4 and "
        "fc: ResNet, ResNeXt, Wide ResNet) and flat transformer blocks (patch_embed and blocks: ViT, DeiT). Write "
        "your own backbones.Backbone for other shapes (README: bring your own network)"
    )


def zoo_backbone(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    model_args: dict[str, Any] | None = None,
) -> Backbone:
    """The model ``name`` as a :class:`Backbone`, built for ``in_channels`` x ``image_size`` images
    with ``model_args`` (its own keyword arguments): ``timm:<model>``, ``torchvision:<model>`` (built by
    its library), or a user's ``<module or file.py>:<function>`` (``function(num_classes=, in_channels=,
    image_size=, **model_args)`` returns a :class:`Backbone`, or a model the adapters split)."""
    source, _, model = name.partition(":")
    if not source or not model:
        raise ValueError(
            f"a model is named timm:<model>, torchvision:<model> or <module or file.py>:<function>: {name!r}"
        )
    args = dict(model_args or {})
    if source == "timm":
        net = _timm_model(model, num_classes, in_channels, image_size, args)
    elif source == "torchvision":
        net = _torchvision_model(model, num_classes, in_channels, args)
    else:
        net = _user_function(source, model)(
            num_classes=num_classes, in_channels=in_channels, image_size=image_size, **args
        )
    kwargs = {"in_channels": in_channels, "image_size": image_size, "model_args": dict(model_args or {})}
    if isinstance(net, Backbone):  # the user's own split: named as the run names it, so a checkpoint rebuilds it
        net.arch, net.arch_kwargs = name, kwargs
        return net.eval()
    stem, blocks, head = split(net, name)
    backbone = Backbone(
        stem, blocks, head, num_classes=num_classes, input_size=(in_channels, image_size, image_size), arch=name,
        arch_kwargs=kwargs,
    )  # fmt: skip
    return backbone.eval()


def _user_function(source: str, function: str) -> Callable[..., Any]:
    """``function`` of the module ``source`` (a dotted name, or a ``.py`` file)."""
    import importlib
    import importlib.util
    from pathlib import Path

    if source.endswith(".py"):
        path = Path(source).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--backbone {source}:{function}: no such file {source}")
        spec = importlib.util.spec_from_file_location(f"skipnet_user_backbone_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    if not callable(getattr(module, function, None)):
        raise ValueError(f"--backbone {source}:{function}: {source} has no function {function!r}")
    return getattr(module, function)


def default_optimizer(arch: str) -> Literal["sgd", "adamw"]:
    """How the base trainer trains ``arch`` when not told: AdamW for vision transformers, SGD otherwise."""
    source, _, model = arch.partition(":")
    return "adamw" if source == "timm" and model.startswith(("vit_", "deit_")) else "sgd"


def parse_model_args(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("depth=6", "embed_dim=64", "act_layer=gelu")`` -> ``{"depth": 6, "embed_dim": 64, "act_layer": "gelu"}``:
    values read as Python literals where they are one, as strings otherwise."""
    import ast

    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"--backbone-args takes key=value pairs (depth=6 embed_dim=64), got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out
