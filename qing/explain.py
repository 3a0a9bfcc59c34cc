"""Look inside a model: Grad-CAM for one label, class-token attention maps, attention rollout, CNN feature maps.

**Grad-CAM** (Selvaraju et al., 2017) is class-specific: for a chosen output ``c`` it weighs each
channel ``k`` of the backbone's last feature map ``A`` by the spatial mean of the gradient of the
logit ``y_c``, ``alpha_k = mean_ij d y_c / d A_k[i, j]``, and keeps the positive part of
``sum_k alpha_k A_k``: the regions whose features push **this** output up. It works for every model
with a CNN backbone (qing's hybrids, where the gradient flows back through the Transformer, and plain
timm CNNs such as DenseNet121). It is a coarse map (the ``h x w`` grid of the last stage), and a
heuristic: sanity-check it (:func:`grad_cam` of a model with randomized weights should look different,
Adebayo et al., 2018).

A qing model turns the image into an ``h x w`` grid of tokens (``h = H / feat_stride``),
prepends a class token and mixes them with self-attention. Row 0 of a block's attention
matrix says how much the class token draws from each grid cell in that block; these
functions upsample such rows to the image and lay them over it (the heatmaps of the
original design).

What a heatmap means, and what it does not:

- It shows where the class token **read from** in the token grid, relative to the other
  cells of the same image (maps are min-max scaled per image, so a uniform map looks as
  contrasted as a peaked one). Each cell covers a ``feat_stride x feat_stride`` patch and,
  through the CNN's receptive field, context well beyond it.
- It is **not** a causal or class-specific explanation: attention weights do not say which
  pixels changed the prediction, nor in which direction, and the head also reads the mean
  of all spatial tokens (``global_pool="token_avg"``), which attention does not show.
  Attention rollout (Abnar & Zuidema, 2020) is a heuristic that tracks how attention mixes
  through the residual stream; it is a better summary than one head, not ground truth.
- Use heatmaps to spot shortcuts (text markers, tubes, image borders) and sanity-check
  models, never as clinical evidence. qing is for research use, not a medical device.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from qing._io import save_figure

__all__ = [
    "EXPLAIN_METHODS",
    "HEATMAP_METHODS",
    "attention_maps",
    "attention_rollout",
    "class_token_heatmap",
    "denormalize",
    "feature_maps",
    "grad_cam",
    "gradcam_layer",
    "heatmaps",
    "overlay",
    "save_attention_figure",
    "save_attention_overlays",
    "save_feature_maps_figure",
    "save_gradcam_figure",
    "save_gradcam_overlays",
]

#: ``method`` values of :func:`class_token_heatmap`.
HEATMAP_METHODS = ("rollout", "last")

#: ``method`` values of :func:`heatmaps` (``qing explain --method``, ``qing predict --heatmap-method``).
EXPLAIN_METHODS = ("gradcam", "rollout", "last")

PathLike = Union[str, Path]


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _to_model(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor batch (B, C, H, W), got {shape}")
    param = next(model.parameters(), None)
    return images.to(param.device, param.dtype) if param is not None else images


def _grid_size(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    stride = getattr(model, "feat_stride", None)
    if not stride or not hasattr(model, "forward_attention"):
        raise TypeError(
            f"{type(model).__name__} is not a qing CNNTransformer (needs forward_attention and feat_stride)"
        )
    return images.shape[-2] // stride, images.shape[-1] // stride


def _forward_attention(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
    images = _to_model(model, images)
    h, w = _grid_size(model, images)
    with _inference(model):
        attentions = [a.float().cpu() for a in model.forward_attention(images)]
    tokens = attentions[0].shape[-1]
    if tokens != 1 + h * w:
        raise ValueError(f"attention over {tokens} tokens does not match 1 class token + a {h}x{w} grid")
    return attentions, (h, w)


def attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class-token attention to the spatial tokens of every block and head.

    Args:
        model: A qing ``CNNTransformer`` (run in eval mode without gradients; its mode is restored).
        images: Normalized images ``(B, C, H, W)``, ``H`` and ``W`` multiples of ``model.feat_stride``.

    Returns:
        float32 CPU tensor ``(B, depth, heads, h, w)`` with ``h, w = H / feat_stride, W / feat_stride``;
        entry ``[b, l, k, i, j]`` is block ``l``, head ``k``'s weight from the class token to grid
        cell ``(i, j)``. Over a head's grid the entries sum to ``1 -`` the class token's self-attention.
    """
    attentions, (h, w) = _forward_attention(model, images)
    return torch.stack([a[:, :, 0, 1:].reshape(a.shape[0], a.shape[1], h, w) for a in attentions], dim=1)


def attention_rollout(attentions: Sequence[torch.Tensor], *, residual: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) through a stack of blocks.

    Per block the heads are averaged; with ``residual`` the identity is added (the skip
    connection) and rows renormalized, ``A = (mean_heads(W) + I) / 2`` for row-stochastic
    ``W``. The blocks are then multiplied from the input up: ``R = A_L @ ... @ A_2 @ A_1``.

    Args:
        attentions: One ``(B, heads, T, T)`` tensor per block, input to output
            (as ``model.forward_attention`` returns).
        residual: Account for the residual connection (the paper's rollout); ``False``
            multiplies the raw head-averaged attention.

    Returns:
        ``(B, T, T)``; row 0 is how much the final class token draws from each input token.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one attention tensor")
    rollout: Optional[torch.Tensor] = None
    for weights in attentions:
        if weights.dim() != 4 or weights.shape[-1] != weights.shape[-2]:
            raise ValueError(f"attention must be (B, heads, T, T), got {list(weights.shape)}")
        a = weights.float().mean(dim=1)
        if residual:
            a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Scale each ``(..., H, W)`` map to ``[0, 1]``; constant maps become zeros."""
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return scaled.reshape(maps.shape)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, K, h, w)`` grid maps -> ``(B, K, H, W)`` by bilinear interpolation, each scaled to ``[0, 1]``."""
    return _minmax(F.interpolate(maps, size=size, mode="bilinear", align_corners=False))


def class_token_heatmap(model: nn.Module, images: torch.Tensor, *, method: str = "rollout") -> torch.Tensor:
    """One heatmap per image of where the class token looks, at image resolution.

    Args:
        model: A qing ``CNNTransformer``.
        images: Normalized images ``(B, C, H, W)``.
        method: ``"rollout"`` (attention rollout over all blocks, with residuals) or
            ``"last"`` (the last block's class-token attention averaged over heads).

    Returns:
        float32 CPU tensor ``(B, H, W)`` in ``[0, 1]`` (min-max per image, bilinear upsampling).
        Read the module docstring before interpreting it.
    """
    if method not in HEATMAP_METHODS:
        raise ValueError(f"method={method!r} is not one of {HEATMAP_METHODS}")
    attentions, (h, w) = _forward_attention(model, images)
    if method == "rollout":
        cls_row = attention_rollout(attentions)[:, 0, 1:]
    else:
        cls_row = attentions[-1].mean(dim=1)[:, 0, 1:]
    grid = cls_row.reshape(-1, 1, h, w)
    return _upsample(grid, tuple(images.shape[-2:]))[:, 0]


def gradcam_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The module whose output Grad-CAM uses: the backbone's last stage.

    For a qing ``CNNTransformer`` the last entry of ``model.backbone.feature_info`` (the feature map the
    tokens are made from); for a timm CNN the last entry of ``model.feature_info`` (e.g.
    ``features.norm5`` of DenseNet121, ``layer4`` of a ResNet).

    Returns:
        ``(qualified module name, module)``.

    Raises:
        TypeError: The model has no timm ``feature_info`` to find its last stage in.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is not None and getattr(backbone, "feature_info", None):
        prefix, info = "backbone.", backbone.feature_info
    else:
        prefix, info = "", getattr(model, "feature_info", None)
    if not info or not isinstance(info[-1], dict) or "module" not in info[-1]:
        raise TypeError(
            f"{type(model).__name__} has no timm feature_info to find its last CNN stage; pass layer= explicitly"
        )
    name = prefix + info[-1]["module"]
    return name, model.get_submodule(name)


def _label_index(model: nn.Module, label: Union[int, str, None], num_outputs: int) -> Optional[int]:
    if label is None or isinstance(label, int):
        if label is not None and not -num_outputs <= label < num_outputs:
            raise ValueError(f"label {label} is out of range for a model with {num_outputs} outputs")
        return None if label is None else label % num_outputs
    names = list((getattr(model, "pretrained_cfg", None) or {}).get("label_names") or ())
    if label not in names:
        raise ValueError(f"label {label!r} is not one of the model's labels {names or '(none recorded)'}")
    return names.index(label)


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    *,
    label: Union[int, str, None] = None,
    layer: Optional[nn.Module] = None,
    normalize: bool = True,
    return_labels: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Grad-CAM of one output at the backbone's last stage, upsampled to the image.

    ``cam = relu(sum_k alpha_k A_k)`` with ``A`` the layer's ``(K, h, w)`` output and
    ``alpha_k = mean_ij d logit_c / d A_k[i, j]`` (see the module docstring). The model runs in eval mode
    (its mode is restored); its parameters are not changed and get no ``.grad``.

    Args:
        model: A qing ``CNNTransformer`` or a timm CNN (anything :func:`gradcam_layer` finds a stage in,
            or any model with ``layer`` given).
        images: Normalized images ``(B, C, H, W)``.
        label: The output to explain: an index, a name from ``model.pretrained_cfg["label_names"]``, or
            ``None`` for each image's highest logit (for a binary model the single output).
        layer: The module whose ``(B, K, h, w)`` output is used (default :func:`gradcam_layer`).
        normalize: Scale each map to ``[0, 1]`` (min-max per image; an all-zero map stays zero).
        return_labels: Also return the ``(B,)`` output index explained for each image.

    Returns:
        float32 CPU tensor ``(B, H, W)`` (bilinear upsampling of the ``h x w`` map), and with
        ``return_labels`` the explained output indices.
    """
    if layer is None:
        layer = gradcam_layer(model)[1]
    images = _to_model(model, images)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(output))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # an input that needs grad: a graph to the feature map even where the weights are frozen
            x = images.detach().clone().requires_grad_(True)
            logits = model(x)
            if not captured or captured[-1].dim() != 4:
                got = list(captured[-1].shape) if captured else "no output"
                raise ValueError(f"Grad-CAM needs a (B, K, h, w) feature map from its layer, got {got}")
            fmap = captured[-1]
            index = _label_index(model, label, logits.shape[1])
            chosen = logits.argmax(dim=1) if index is None else torch.full_like(logits[:, 0], index, dtype=torch.long)
            score = logits.gather(1, chosen[:, None]).sum()
            (grads,) = torch.autograd.grad(score, fmap)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap.detach().float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    cam = (_minmax(cam) if normalize else cam).cpu()
    return (cam, chosen.cpu()) if return_labels else cam


def heatmaps(
    model: nn.Module, images: torch.Tensor, *, method: str = "gradcam", label: Union[int, str, None] = None
) -> torch.Tensor:
    """One ``[0, 1]`` heatmap per image by ``method``: what ``qing predict --heatmaps`` and the report draw.

    Args:
        model: A model (``"rollout"`` and ``"last"`` need a qing ``CNNTransformer``).
        images: Normalized images ``(B, C, H, W)``.
        method: ``"gradcam"`` (:func:`grad_cam` for ``label``), ``"rollout"`` or ``"last"``
            (:func:`class_token_heatmap`; not class-specific, ``label`` must be ``None``).
        label: Grad-CAM's output (index or name; ``None``: the highest logit per image).

    Returns:
        float32 CPU tensor ``(B, H, W)``.
    """
    if method not in EXPLAIN_METHODS:
        raise ValueError(f"method={method!r} is not one of {EXPLAIN_METHODS}")
    if method == "gradcam":
        return grad_cam(model, images, label=label)
    if label is not None:
        raise ValueError(f"method={method!r} is attention, not class-specific: it takes no label (use 'gradcam')")
    return class_token_heatmap(model, images, method=method)


def feature_maps(
    model: nn.Module, images: torch.Tensor, *, n: int = 16, return_indices: bool = False
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The ``n`` most active channels of the CNN backbone's last feature map.

    "Most active" = highest mean activation over the map, chosen per image.

    Args:
        model: A model with ``model.backbone.forward_features`` (any qing ``CNNTransformer``).
        images: Normalized images ``(B, C, H, W)``.
        n: Channels to keep (at most the backbone's ``F`` channels: fewer are returned if ``F < n``).
        return_indices: Also return the channel indices.

    Returns:
        float32 CPU tensor ``(B, min(n, F), h, w)`` in descending activation order, and with
        ``return_indices`` the ``(B, min(n, F))`` channel indices.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "forward_features"):
        raise TypeError(f"{type(model).__name__} has no backbone.forward_features")
    images = _to_model(model, images)
    with _inference(model):
        fmap = backbone.forward_features(images).float().cpu()
    index = fmap.mean(dim=(2, 3)).topk(min(n, fmap.shape[1]), dim=1).indices
    maps = torch.gather(fmap, 1, index[:, :, None, None].expand(-1, -1, *fmap.shape[-2:]))
    return (maps, index) if return_indices else maps


def _stats(values: Sequence[float], channels: int, what: str) -> torch.Tensor:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else np.ravel(values))]
    if len(values) not in (1, channels):
        if channels == 1 and len(set(values)) == 1:  # 3 equal values (a gray cfg) for a 1-channel model
            values = values[:1]
        else:
            expected = "1 value" if channels == 1 else f"1 or {channels} values"
            raise ValueError(f"{what} has {len(values)} values for a {channels}-channel image; give {expected}")
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize(mean, std)``: ``x * std + mean``, clamped to ``[0, 1]``.

    Args:
        x: ``(C, H, W)`` or ``(B, C, H, W)`` normalized image(s).
        mean: ``C`` values (or 1; 3 equal values are accepted for a 1-channel image).
        std: Like ``mean``.

    Returns:
        float32 CPU tensor of ``x``'s shape in ``[0, 1]``.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"expected an image (C, H, W) or batch (B, C, H, W), got shape {list(x.shape)}")
    channels = x.shape[-3]
    mean_, std_ = _stats(mean, channels, "mean"), _stats(std, channels, "std")
    out = x.detach().float().cpu() * std_ + mean_
    return out.clamp(0.0, 1.0)


def _as_rgb(image: Any) -> np.ndarray:
    """``(C, H, W)`` tensor or ``(H, W)`` / ``(H, W, C)`` array in [0, 1] (or uint8) -> float ``(H, W, 3)``."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"image tensor must be (C, H, W), got shape {list(image.shape)}")
        image = image.detach().float().cpu().permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"image must be gray or RGB (H, W[, 1|3]), got shape {list(arr.shape)}")
    return np.clip(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr, 0.0, 1.0)


def overlay(image: Any, heatmap: Any, *, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a colored heatmap over an image.

    Args:
        image: ``(C, H, W)`` tensor in ``[0, 1]`` (e.g. from :func:`denormalize`; ``C`` 1 or 3)
            or an ``(H, W)`` / ``(H, W, C)`` array in ``[0, 1]`` or uint8.
        heatmap: ``(H, W)`` values in ``[0, 1]``.
        alpha: Heatmap weight: ``(1 - alpha) * image + alpha * cmap(heatmap)``.
        cmap: Matplotlib colormap name.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb(image)
    heat = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap shape {list(heat.shape)} does not match the image's {list(rgb.shape[:2])}")
    colors = matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]
    return np.round(255.0 * ((1.0 - alpha) * rgb + alpha * colors)).astype(np.uint8)


def _mean_std(model: nn.Module, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> tuple:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean") if mean is None else mean
    std = cfg.get("std") if std is None else std
    if mean is None or std is None:
        raise ValueError("mean and std are needed to show the input; pass them or use a model with a pretrained_cfg")
    return mean, std


_TITLE_CHARS_PER_INCH = 11  # of "medium" (10 pt) text, a little wider than the average character
_TITLE_LINE_HEIGHT = 0.2  # inches


def _image_grid(rows: int, cols: int, *, cell_w: float, cell_h: float, title: str) -> tuple[Figure, np.ndarray]:
    """``rows x cols`` image axes (axes off) with room for a small title above each and ``title`` on top.

    The figure title is wrapped to the figure's width (a narrow figure of one or two images gets
    more lines, not a clipped title). Fixed spacing instead of constrained layout, which is slow on
    figures with dozens of axes.
    """
    width = cell_w * cols
    lines = textwrap.wrap(title, width=max(16, int((width - 0.3) * _TITLE_CHARS_PER_INCH))) or [""]
    extra = _TITLE_LINE_HEIGHT * (len(lines) - 1)
    height = cell_h * rows + 0.45 + extra
    fig = Figure(figsize=(width, height))
    image_h = cell_h - 0.3
    fig.subplots_adjust(
        left=0.05 / width,
        right=1 - 0.05 / width,
        bottom=0.05 / height,
        top=1 - (0.7 + extra) / height,
        wspace=0.1 / (cell_w - 0.1),
        hspace=0.3 / image_h,
    )
    fig.suptitle("\n".join(lines), fontsize="medium", y=1 - 0.1 / height, va="top")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    return fig, axes


def _one_image(image: torch.Tensor, caller: str) -> torch.Tensor:
    """``(C, H, W)`` or ``(1, C, H, W)`` -> ``(1, C, H, W)``; anything else is an error naming ``caller``."""
    batch = image.unsqueeze(0) if image.dim() == 3 else image
    if batch.dim() != 4 or batch.shape[0] != 1:
        raise ValueError(f"{caller} takes one image (C, H, W), got shape {list(image.shape)}")
    return batch


def _show(ax: Any, picture: np.ndarray, title: str = "", **kwargs: Any) -> None:
    ax.imshow(picture, **kwargs)
    ax.set_title(title, fontsize="small")
    ax.set_axis_off()


def save_attention_figure(
    model: nn.Module,
    image: torch.Tensor,
    path: PathLike,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    alpha: float = 0.45,
) -> Path:
    """One image's attention in one figure (what ``qing explain`` writes).

    First row: the input, the rollout heatmap over it and the last block's head-mean
    heatmap over it. Then one row per block with one overlay per head.

    Args:
        model: A qing ``CNNTransformer``.
        image: One normalized image ``(C, H, W)`` or ``(1, C, H, W)``.
        path: PNG file to write.
        mean: Normalization mean (default ``model.pretrained_cfg["mean"]``).
        std: Normalization std (default ``model.pretrained_cfg["std"]``).
        alpha: Heatmap opacity.

    Returns:
        ``path``.
    """
    batch = _one_image(image, "save_attention_figure")
    mean, std = _mean_std(model, mean, std)
    picture = denormalize(batch[0], mean, std)
    size = tuple(batch.shape[-2:])
    attentions, (h, w) = _forward_attention(model, batch)
    rollout = _upsample(attention_rollout(attentions)[:, 0, 1:].reshape(1, 1, h, w), size)[0, 0]
    heads = torch.stack([a[0, :, 0, 1:].reshape(-1, h, w) for a in attentions])  # (depth, heads, h, w)
    per_head = _upsample(heads, size)
    depth, num_heads = heads.shape[:2]
    cols = max(3, num_heads)
    title = f"class-token attention ({h}x{w} token grid); not a causal explanation"
    fig, axes = _image_grid(depth + 1, cols, cell_w=2.0, cell_h=2.1, title=title)
    _show(axes[0, 0], _as_rgb(picture), "input")
    _show(axes[0, 1], overlay(picture, rollout, alpha=alpha), "rollout")
    _show(axes[0, 2], overlay(picture, _minmax(per_head[-1].mean(dim=0)), alpha=alpha), "last block, mean of heads")
    for block in range(depth):
        for head in range(num_heads):
            _show(
                axes[block + 1, head],
                overlay(picture, per_head[block, head], alpha=alpha),
                f"block {block} head {head}",
            )
    return save_figure(fig, path)


def save_attention_overlays(
    model: nn.Module,
    images: torch.Tensor,
    path: PathLike,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    method: str = "rollout",
    titles: Optional[Sequence[str]] = None,
    alpha: float = 0.45,
) -> Path:
    """A row of inputs above a row of their class-token heatmaps (the report's ``attention.png``).

    Args:
        model: A qing ``CNNTransformer``.
        images: Normalized images ``(B, C, H, W)``.
        path: PNG file to write.
        mean: Normalization mean (default from ``model.pretrained_cfg``).
        std: Normalization std (default from ``model.pretrained_cfg``).
        method: ``"rollout"`` or ``"last"`` (see :func:`class_token_heatmap`).
        titles: Optional caption per image (e.g. the target and predicted probability).
        alpha: Heatmap opacity.

    Returns:
        ``path``.
    """
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    mean, std = _mean_std(model, mean, std)
    heatmaps = class_token_heatmap(model, images, method=method)
    pictures = denormalize(images, mean, std)
    title = "class-token attention over the input (where the model read from, not why)"
    fig, axes = _image_grid(2, len(images), cell_w=2.2, cell_h=2.3, title=title)
    for i, (picture, heat) in enumerate(zip(pictures, heatmaps)):
        _show(axes[0, i], _as_rgb(picture), titles[i] if titles is not None else f"image {i}")
        _show(axes[1, i], overlay(picture, heat, alpha=alpha), method)
    return save_figure(fig, path)


def save_feature_maps_figure(
    model: nn.Module,
    images: torch.Tensor,
    path: PathLike,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    n: int = 8,
) -> Path:
    """Each input next to its ``n`` most active backbone channels (the report's ``feature_maps.png``).

    Args:
        model: A qing ``CNNTransformer`` (or any model with ``backbone.forward_features``).
        images: Normalized images ``(B, C, H, W)``.
        path: PNG file to write.
        mean: Normalization mean (default from ``model.pretrained_cfg``).
        std: Normalization std (default from ``model.pretrained_cfg``).
        n: Channels per image (see :func:`feature_maps`).

    Returns:
        ``path``.
    """
    mean, std = _mean_std(model, mean, std)
    maps, index = feature_maps(model, images, n=n, return_indices=True)
    pictures = denormalize(images, mean, std)
    cols = 1 + maps.shape[1]
    grid = "x".join(str(s) for s in maps.shape[-2:])
    title = f"most active CNN feature maps ({grid} grid, per-map color scale)"
    fig, axes = _image_grid(len(images), cols, cell_w=1.6, cell_h=1.75, title=title)
    for i, picture in enumerate(pictures):
        _show(axes[i, 0], _as_rgb(picture), f"image {i}")
        for k in range(maps.shape[1]):
            _show(axes[i, k + 1], maps[i, k].numpy(), f"ch {int(index[i, k])}", cmap="viridis", interpolation="nearest")
    return save_figure(fig, path)


def _output_name(model: nn.Module, index: int) -> str:
    names = list((getattr(model, "pretrained_cfg", None) or {}).get("label_names") or ())
    return str(names[index]) if index < len(names) and names[index] else f"output {index}"


def save_gradcam_overlays(
    model: nn.Module,
    images: torch.Tensor,
    path: PathLike,
    *,
    label: Union[int, str, None] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    titles: Optional[Sequence[str]] = None,
    alpha: float = 0.45,
) -> Path:
    """A row of inputs above a row of their Grad-CAM overlays (the report's ``gradcam.png``).

    Args:
        model: A model :func:`grad_cam` works on.
        images: Normalized images ``(B, C, H, W)``.
        path: PNG file to write.
        label: The output explained (index or name); ``None``: each image's highest logit.
        mean: Normalization mean (default from ``model.pretrained_cfg``).
        std: Normalization std (default from ``model.pretrained_cfg``).
        titles: Optional caption per image.
        alpha: Heatmap opacity.

    Returns:
        ``path``.
    """
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    mean, std = _mean_std(model, mean, std)
    cams, chosen = grad_cam(model, images, label=label, return_labels=True)
    pictures = denormalize(images, mean, std)
    title = "Grad-CAM at the last CNN stage: regions raising the named output's logit"
    fig, axes = _image_grid(2, len(images), cell_w=2.2, cell_h=2.3, title=title)
    for i, (picture, cam) in enumerate(zip(pictures, cams)):
        _show(axes[0, i], _as_rgb(picture), titles[i] if titles is not None else f"image {i}")
        _show(axes[1, i], overlay(picture, cam, alpha=alpha), f"Grad-CAM: {_output_name(model, int(chosen[i]))}")
    return save_figure(fig, path)


def save_gradcam_figure(
    model: nn.Module,
    image: torch.Tensor,
    path: PathLike,
    *,
    labels: Optional[Sequence[Union[int, str]]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    alpha: float = 0.45,
) -> Path:
    """One image's Grad-CAM for one or more outputs, beside its attention rollout (``qing explain --method gradcam``).

    Panels: the input, one Grad-CAM overlay per output of ``labels``, and, for a qing
    ``CNNTransformer``, the class-token attention rollout (not class-specific) for comparison.

    Args:
        model: A model :func:`grad_cam` works on.
        image: One normalized image ``(C, H, W)`` or ``(1, C, H, W)``.
        path: PNG file to write.
        labels: Outputs to explain (indices or names); default: the highest logit.
        mean: Normalization mean (default ``model.pretrained_cfg["mean"]``).
        std: Normalization std (default ``model.pretrained_cfg["std"]``).
        alpha: Heatmap opacity.

    Returns:
        ``path``.
    """
    batch = _one_image(image, "save_gradcam_figure")
    mean, std = _mean_std(model, mean, std)
    picture = denormalize(batch[0], mean, std)
    panels = [("input", _as_rgb(picture))]
    for label in labels or [None]:
        cam, chosen = grad_cam(model, batch, label=label, return_labels=True)
        panels.append((f"Grad-CAM: {_output_name(model, int(chosen[0]))}", overlay(picture, cam[0], alpha=alpha)))
    if hasattr(model, "forward_attention") and getattr(model, "feat_stride", None):
        rollout = class_token_heatmap(model, batch)[0]
        panels.append(("attention rollout (any class)", overlay(picture, rollout, alpha=alpha)))
    title = "Grad-CAM (class-specific) at the last CNN stage; a heuristic, not a causal proof"
    fig, axes = _image_grid(1, len(panels), cell_w=2.6, cell_h=2.7, title=title)
    for ax, (caption, shown) in zip(axes[0], panels):
        _show(ax, shown, caption)
    return save_figure(fig, path)
