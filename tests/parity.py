"""Shared helpers for logits parity against timm / torchvision (the `[test]` extra).

Usage in a family's test module:

    torch = pytest.importorskip('torch')
    from parity import assert_logits_match
    err = assert_logits_match('resnet50', torchvision.models.resnet50(), resolution=193)

The reference model is put in eval mode and its normalization layers get random
statistics and affine parameters first: with the default init (mean 0, var 1, scale 1,
offset 0) a wrong mapping of running statistics would go unnoticed.
"""

from __future__ import annotations

import numpy as np

import models


def randomize_norms(torch_model, seed: int = 0) -> None:
    """Random running stats and affine parameters for every BatchNorm / GroupNorm."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in torch_model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm)) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)


def numpy_state_dict(torch_model) -> dict[str, np.ndarray]:
    """The plain name -> array mapping our converters take (what safetensors/npz hold)."""
    return {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}


def assert_logits_match(
    model_name: str,
    torch_model,
    *,
    resolution: int,
    batch: int = 2,
    atol: float = 1e-4,
    seed: int = 0,
    num_classes: int | None = None,
    in_chans: int = 3,
    **overrides,
) -> float:
    """Converts `torch_model`'s weights, runs both in eval mode, checks max |diff| <= atol.

    Returns the max absolute logit difference (for reporting).
    """
    import torch

    torch.manual_seed(seed)
    torch_model.eval()
    randomize_norms(torch_model, seed)
    variables = models.convert_state_dict(
        model_name, numpy_state_dict(torch_model), strict=True, num_classes=num_classes, **overrides
    )
    x = np.random.default_rng(seed).standard_normal((batch, in_chans, resolution, resolution))
    x = x.astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    model = models.create_model(model_name, num_classes=num_classes, **overrides)
    got = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1), train=False))
    assert got.shape == expected.shape, (got.shape, expected.shape)
    err = float(np.max(np.abs(got - expected)))
    assert err <= atol, f'{model_name} @ {resolution}px: max |logit diff| {err:.3g} > {atol}'
    return err
