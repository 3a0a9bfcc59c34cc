"""qing.explain: attention maps and rollout, heatmaps, feature maps, overlays and figures."""

import re

import matplotlib
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import qing
from qing import explain


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return qing.create_model("qing_test_tr1", num_classes=1)


def test_rollout_hand_made_two_layers():
    # Layer 1, two heads: identity and "everyone but me"; their mean M1 = [[.5,.25,.25],[.25,.5,.25],[.25,.25,.5]].
    # With the residual: A1 = (M1 + I) / 2 = [[.75,.125,.125],[.125,.75,.125],[.125,.125,.75]].
    l1 = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]])
    # Layer 2, two equal heads: the class token reads tokens 1 and 2 as 3:1, the others themselves.
    # A2 = (W2 + I) / 2 -> row 0 = [.5, .375, .125].
    w2 = torch.tensor([[0, 0.75, 0.25], [0, 1.0, 0], [0, 0, 1.0]])
    l2 = torch.stack([w2, w2])
    # R = A2 @ A1; row 0 = .5*[.75,.125,.125] + .375*[.125,.75,.125] + .125*[.125,.125,.75]
    #                    = [.4375, .359375, .203125]; rows 1, 2 = rows 1, 2 of A1.
    rollout = explain.attention_rollout([l1[None], l2[None]])
    expected = torch.tensor([[0.4375, 0.359375, 0.203125], [0.125, 0.75, 0.125], [0.125, 0.125, 0.75]])
    assert torch.equal(rollout[0], expected)
    # Without the residual: W2 @ M1, row 0 = .75*[.25,.5,.25] + .25*[.25,.25,.5] = [.25, .4375, .3125].
    raw = explain.attention_rollout([l1[None], l2[None]], residual=False)
    assert torch.equal(raw[0, 0], torch.tensor([0.25, 0.4375, 0.3125]))
    # The order matters: layer 2 after layer 1 is not layer 1 after layer 2.
    assert not torch.equal(explain.attention_rollout([l2[None], l1[None]])[0], expected)
    with pytest.raises(ValueError, match=re.escape("attention must be (B, heads, T, T), got [2, 3, 3]")):
        explain.attention_rollout([l1])


def test_attention_maps_follow_the_token_grid(model):
    x = torch.randn(2, 3, 64, 96)  # grid 2 x 3, 7 tokens
    model.train()
    maps = explain.attention_maps(model, x)
    assert maps.shape == (2, 1, 4, 2, 3) and maps.dtype == torch.float32
    assert model.training  # mode restored
    assert torch.equal(explain.attention_maps(model, x), maps)  # no dropout while explaining
    model.eval()
    with torch.no_grad():
        (weights,) = model.forward_attention(x)
    for i in range(2):
        for j in range(3):  # token 1 + i * w + j is grid cell (i, j)
            assert torch.equal(maps[:, 0, :, i, j], weights[:, :, 0, 1 + i * 3 + j])
    # each head's class-token row sums to 1 over all 7 tokens
    torch.testing.assert_close(maps.sum((-1, -2)) + weights[:, :, 0, 0][:, None], torch.ones(2, 1, 4))


def test_heatmaps_rollout_and_last(model):
    x = torch.randn(2, 3, 64, 64)
    rollout = explain.class_token_heatmap(model, x)
    last = explain.class_token_heatmap(model, x, method="last")
    assert rollout.shape == (2, 64, 64)
    assert rollout.amin((1, 2)).tolist() == [0.0, 0.0] and rollout.amax((1, 2)).tolist() == [1.0, 1.0]
    # with one block the identity only adds to the class token itself, so both methods agree
    torch.testing.assert_close(rollout, last)
    with pytest.raises(ValueError, match=re.escape("method='grad' is not one of ('rollout', 'last')")):
        explain.class_token_heatmap(model, x, method="grad")


def test_rollout_heatmap_of_a_two_block_model():
    torch.manual_seed(1)
    deep = qing.create_model("qing_test_tr1", num_classes=2, depth=2).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a1, a2 = (w.mean(1)[0].double() for w in deep.forward_attention(x))
    eye = torch.eye(5, dtype=torch.float64)
    expected_row = (((a2 + eye) / 2) @ ((a1 + eye) / 2))[0, 1:]  # (A2 @ A1), class token to the 2 x 2 grid
    up = F.interpolate(expected_row.float().reshape(1, 1, 2, 2), size=(64, 64), mode="bilinear")[0, 0]
    expected = (up - up.min()) / (up.max() - up.min())
    torch.testing.assert_close(explain.class_token_heatmap(deep, x), expected[None], atol=1e-4, rtol=0)
    assert not torch.allclose(explain.class_token_heatmap(deep, x, method="last"), expected[None], atol=1e-3)


def test_feature_maps_are_the_most_active_channels(model):
    x = torch.randn(2, 3, 64, 64)
    maps, index = explain.feature_maps(model, x, n=5, return_indices=True)
    with torch.no_grad():
        fmap = model.eval().backbone.forward_features(x)
    assert maps.shape == (2, 5, 2, 2) and index.shape == (2, 5)
    means = fmap.mean((2, 3))
    for b in range(2):
        assert index[b].tolist() == means[b].argsort(descending=True)[:5].tolist()
        assert torch.equal(maps[b], fmap[b, index[b]])
    assert explain.feature_maps(model, x, n=10_000).shape == (2, fmap.shape[1], 2, 2)  # at most F channels


def test_denormalize_and_overlay():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image = torch.rand(3, 8, 8)
    normalized = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(explain.denormalize(normalized, mean, std), image)
    gray = torch.rand(1, 1, 4, 4)
    torch.testing.assert_close(explain.denormalize((gray - 0.485) / 0.229, (0.485,) * 3, (0.229,) * 3), gray)
    with pytest.raises(ValueError, match=re.escape("mean has 3 values for a 1-channel image; give 1 value")):
        explain.denormalize(gray, mean, std)

    heat = np.linspace(0, 1, 64).reshape(8, 8)
    colors = matplotlib.colormaps["jet"](heat)[..., :3]
    assert np.array_equal(explain.overlay(image, heat, alpha=1.0), np.round(255 * colors).astype(np.uint8))
    plain = explain.overlay(image, heat, alpha=0.0)
    assert np.array_equal(plain, np.round(255 * image.permute(1, 2, 0).numpy()).astype(np.uint8))
    mixed = explain.overlay(torch.full((1, 8, 8), 0.5), heat)  # gray image -> RGB
    assert mixed.shape == (8, 8, 3) and mixed.dtype == np.uint8
    assert np.array_equal(mixed, np.round(255 * (0.55 * 0.5 + 0.45 * colors)).astype(np.uint8))
    with pytest.raises(ValueError, match=re.escape("heatmap shape [4, 4] does not match the image's [8, 8]")):
        explain.overlay(image, np.zeros((4, 4)))


def _assert_real_png(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels.min(axis=2) < 250).mean() > 0.05  # not blank
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # real image content, not flat fills


def test_attention_figure_grayscale_model(tmp_path):
    gray = qing.create_model("qing_test_tr1", num_classes=1, in_chans=1)
    x = torch.randn(1, 64, 96)
    path = explain.save_attention_figure(gray, x, tmp_path / "explain.png")
    # 4 heads -> 4 columns of 2.0 in, (1 block + 1) rows of 2.1 in + 0.45 in title, 100 dpi
    _assert_real_png(path, (800, 465))
    assert explain.attention_maps(gray, x[None]).shape == (1, 1, 4, 2, 3)
    with pytest.raises(
        ValueError, match=re.escape("save_attention_figure takes one image (C, H, W), got shape [2, 1, 64, 96]")
    ):
        explain.save_attention_figure(gray, torch.randn(2, 1, 64, 96), tmp_path / "x.png")


def test_overlays_on_real_chest_xrays(model, pneumonia_200, tmp_path):
    files = sorted((pneumonia_200 / "PNEUMONIA").iterdir())[:2] + sorted((pneumonia_200 / "NORMAL").iterdir())[:1]
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    pictures = []
    for file in files:
        with Image.open(file) as im:
            arr = np.asarray(im.convert("RGB").resize((96, 96)), dtype=np.float32) / 255
        pictures.append(torch.from_numpy(arr).permute(2, 0, 1))
    images = (torch.stack(pictures) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    path = explain.save_attention_overlays(model, images, tmp_path / "attention.png", titles=[f.name for f in files])
    _assert_real_png(path, (660, 525))
    _assert_real_png(explain.save_feature_maps_figure(model, images, tmp_path / "fm.png", n=4), (800, 570))


# ---- Grad-CAM ------------------------------------------------------------------------------------------


def test_gradcam_is_cam_for_a_global_pool_linear_head():
    """With logits = W GAP(A) + b the gradient is W[c] / (h w) everywhere, so Grad-CAM = relu(W[c] . A) / (h w)."""
    torch.manual_seed(0)
    cnn = timm.create_model("test_resnet", num_classes=3).eval()
    assert explain.gradcam_layer(cnn)[0] == "layer4"
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        fmap = cnn.forward_features(x)  # (2, 96, 4, 4)
    for c in range(3):
        cam = explain.grad_cam(cnn, x, label=c, normalize=False)
        expected = F.relu(torch.einsum("k,bkhw->bhw", cnn.get_classifier().weight[c], fmap)) / 16
        expected = F.interpolate(expected[:, None], size=(128, 128), mode="bilinear", align_corners=False)[:, 0]
        assert cam.shape == (2, 128, 128)
        assert torch.allclose(cam, expected, atol=1e-7)
    assert all(p.grad is None for p in cnn.parameters())  # the weights get no gradient


def test_gradcam_of_the_hybrid_goes_back_through_the_transformer(model):
    model = qing.create_model("qing_test_tr1", num_classes=3, img_size=64).eval()
    model.pretrained_cfg["label_names"] = ["Atelectasis", "Effusion", "Edema"]
    assert explain.gradcam_layer(model)[0] == "backbone.layer4"
    x = torch.randn(2, 3, 64, 64)
    fmap = model.backbone.forward_features(x).detach().requires_grad_(True)
    logits = model.forward_head(model.norm(model.blocks(model.forward_tokens(fmap))))
    (grads,) = torch.autograd.grad(logits[:, 1].sum(), fmap)
    expected = F.relu((grads.mean(dim=(2, 3), keepdim=True) * fmap).sum(1, keepdim=True)).detach()
    expected = F.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    by_name = explain.grad_cam(model, x, label="Effusion", normalize=False)
    assert torch.allclose(by_name, expected, atol=1e-6)
    maps, chosen = explain.grad_cam(model, x, return_labels=True)  # default: each image's highest logit
    assert chosen.tolist() == model(x).argmax(1).tolist()
    assert maps.min() >= 0 and maps.amax(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0])
    assert explain.heatmaps(model, x, method="gradcam", label=1).shape == (2, 64, 64)
    with pytest.raises(ValueError, match=re.escape("label 'Mass' is not one of the model's labels")):
        explain.grad_cam(model, x, label="Mass")
    with pytest.raises(ValueError, match="method='rollout' is attention, not class-specific: it takes no label"):
        explain.heatmaps(model, x, method="rollout", label=1)
    with pytest.raises(TypeError, match="has no timm feature_info to find its last CNN stage"):
        explain.grad_cam(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)), x)


_LESION_SIZE, _LESION_RADIUS = 32, 3


def _lesion_batch(n: int, generator: torch.Generator):
    """Noise images; positives carry a bright disc (the lesion) in one half, every image a dark disc in the other."""
    s, r = _LESION_SIZE, _LESION_RADIUS
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")

    def disc(centers):
        return (yy - centers[:, :1, None]) ** 2 + (xx - centers[:, 1:, None]) ** 2 <= r * r

    x = torch.randn(n, 1, s, s, generator=generator) * 0.3
    y = (torch.rand(n, generator=generator) < 0.5).float()
    side = torch.randint(0, 2, (n,), generator=generator)
    rows = torch.randint(r + 2, s - r - 2, (n, 2), generator=generator)
    cols = torch.randint(r + 2, s // 2 - r, (n, 2), generator=generator)
    lesion = disc(torch.stack([rows[:, 0], cols[:, 0] + side * (s // 2)], 1))
    distractor = disc(torch.stack([rows[:, 1], cols[:, 1] + (1 - side) * (s // 2)], 1))
    x[:, 0] += 1.5 * lesion * y[:, None, None] - 1.5 * distractor
    return x, y[:, None], lesion


def _small_cnn() -> torch.nn.Sequential:
    conv = [torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()]  # fmt: skip
    return torch.nn.Sequential(*conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 1))


def test_gradcam_finds_the_lesion_and_fails_the_randomization_check():
    """Trained on lesion / no-lesion images (a few seconds), Grad-CAM's peak lies in the lesion; with the weights
    randomized (Adebayo et al., 2018) the map changes and no longer finds it."""
    torch.manual_seed(0)
    cnn = _small_cnn()
    optimizer = torch.optim.AdamW(cnn.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y, _ = _lesion_batch(32, generator)
        loss = F.binary_cross_entropy_with_logits(cnn(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cnn.eval()
    x, y, lesion = _lesion_batch(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert ((cnn(x) > 0).float() == y).float().mean() >= 0.95
    positive = y[:, 0] == 1

    def peak_in_lesion(maps):
        peaks = maps.flatten(1).argmax(1)
        return lesion.flatten(1).gather(1, peaks[:, None])[positive, 0].float().mean().item()

    layer = cnn[7]  # the last ReLU: the (B, 16, 8, 8) map
    trained = explain.grad_cam(cnn, x, label=0, layer=layer)
    assert peak_in_lesion(trained) >= 0.9

    randomized = _small_cnn().eval()  # every layer re-initialized: the cascade's last step
    random_maps = explain.grad_cam(randomized, x, label=0, layer=randomized[7])
    assert peak_in_lesion(random_maps) <= 0.3
    similarity = F.cosine_similarity(trained.flatten(1), random_maps.flatten(1))[positive].mean()
    assert similarity < 0.6
