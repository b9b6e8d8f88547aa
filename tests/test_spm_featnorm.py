"""``tuning.feat_norm``: the SPM's branches see F normalised, so M is not drowned by F's scale."""

from __future__ import annotations

import torch

from segprompt.tuning.spm_layers import SPM, channel_rms_norm


def _spm(feat_norm: bool) -> SPM:
    torch.manual_seed(0)
    spm = SPM(24, 5, channels=16, recurrent=2, feat_norm=feat_norm)
    torch.nn.init.normal_(spm.prompt_out.weight, std=0.05)  # Out_d starts at zero: give W something to do
    return spm.eval()


def test_the_refined_map_ignores_the_scale_of_f_only_when_normalised():
    feat, smap = torch.randn(2, 24, 9, 9), torch.rand(2, 5, 9, 9).softmax(1)
    plain, normed = _spm(False), _spm(True)
    for spm, invariant in ((normed, True), (plain, False)):
        _, m1, _ = spm(feat, smap)
        _, m100, _ = spm(100 * feat, smap)
        assert torch.allclose(m1, m100, atol=1e-5) is invariant
    # the prompt still multiplies the raw F: F + F * W, so the output scales with F
    out1, _, _ = normed(feat, smap)
    out100, _, _ = normed(100 * feat, smap)
    assert torch.allclose(out100, 100 * out1, rtol=1e-4, atol=1e-3)


def test_feat_norm_adds_no_parameters_and_normalises_per_pixel():
    assert sum(p.numel() for p in _spm(True).parameters()) == sum(p.numel() for p in _spm(False).parameters())
    x = torch.randn(3, 7, 4, 5) * torch.arange(1, 6).float()  # another scale in every column
    rms = channel_rms_norm(x).pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
