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

import functools

import jax
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


def _scale_classifier(torch_model, x, target: float) -> None:
    import torch

    linears = [m for m in torch_model.modules() if isinstance(m, torch.nn.Linear)]
    convs = [m for m in torch_model.modules() if isinstance(m, torch.nn.Conv2d)]
    # The head is the last Linear (timm's BiT heads are a 1x1 conv: the last Conv2d).
    head = linears[-1] if linears else convs[-1]
    with torch.no_grad():
        out = torch_model(x)
        out = out[0] if isinstance(out, tuple) else out
        peak = float(out.abs().max())
        if peak > target:
            head.weight.mul_(target / peak)
            if head.bias is not None:
                head.bias.mul_(target / peak)


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
    scale_logits_to: float | None = 10.0,
    **overrides,
) -> float:
    """Converts `torch_model`'s weights, runs both in eval mode, checks max |diff| <= atol.

    With random weights *and* random BatchNorm statistics, deep residual nets produce
    logits in the hundreds or thousands, where float32 rounding alone exceeds 1e-4. So by
    default the reference's final linear layer is rescaled first so that the largest
    |logit| is `scale_logits_to` (a relative check of ~1e-5); every other weight is
    untouched and a wrongly mapped layer still shows an error on the scale of the logits.
    Pass `scale_logits_to=None` to compare the raw model.

    Returns the max absolute logit difference (for reporting).
    """
    import torch

    torch.manual_seed(seed)
    torch_model.eval()
    randomize_norms(torch_model, seed)
    x = np.random.default_rng(seed).standard_normal((batch, in_chans, resolution, resolution))
    x = x.astype(np.float32)
    if scale_logits_to:
        _scale_classifier(torch_model, torch.from_numpy(x), scale_logits_to)
    variables = models.convert_state_dict(
        model_name, numpy_state_dict(torch_model), strict=True, num_classes=num_classes, **overrides
    )
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    model = models.create_model(model_name, num_classes=num_classes, **overrides)
    # jit: one compilation is far cheaper on CPU than op-by-op dispatch of a deep net.
    apply = jax.jit(functools.partial(model.apply, train=False))
    got = np.asarray(apply(variables, x.transpose(0, 2, 3, 1)))
    assert got.shape == expected.shape, (got.shape, expected.shape)
    err = float(np.max(np.abs(got - expected)))
    assert err <= atol, f'{model_name} @ {resolution}px: max |logit diff| {err:.3g} > {atol}'
    return err
