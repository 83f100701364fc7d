"""The ViTs start as the authors' code starts them (the papers are silent on initialisation): VTCC's
and ViT-IC's code use MoCo v3's ViT init, PICI's code MAE's. Each test compares the spread of the
freshly built weights with the formula's; the tolerances are a few percent, far below the gap to
the other scheme (q, k and v: a factor 1.41; the patch embedding: about 2; CLS: 1e-6 vs 0.02)."""
import math

import pytest
import torch

import pici
import vitic
import vtcc

XAVIER_STD = lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))  # uniform(-b, b), b = sqrt(6 / (in + out))
TORCH_DEFAULT_STD = lambda fan_in: 1 / math.sqrt(3 * fan_in)  # nn.Linear / nn.Conv2d: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))


def close(value, expected, rel=0.05):
    return value == pytest.approx(expected, rel=rel)


def networks():
    torch.manual_seed(0)
    return {"vtcc": vtcc.Network(10, 224), "vtcc-patchify": vtcc.Network(10, 224, stem="patchify"),
            "vitic": vitic.Network(10, 128), "pici": pici.Network(10, 224)}


NETS = networks()


@pytest.mark.parametrize("name", ["vtcc", "vtcc-patchify", "vitic"])
def test_mocov3_init_of_vtcc_and_vitic(name):
    """MoCo v3's vits.py, as VTCC's modules/vtcc.py and ViT-IC's modules/transformer.py: Q, K and V each
    Xavier over its own (dim, dim) block of the fused qkv weight; every other Linear Xavier; biases 0;
    CLS token normal with std 1e-6; the stem (conv, or VTCC's patchify) left at torch's default."""
    vit = NETS[name].backbone
    d = vit.dim
    for block in vit.blocks:
        w = block.attn.qkv.weight.detach()
        assert w.shape == (3 * d, d)
        for part in w.split(d):  # q, k, v
            assert close(part.std().item(), XAVIER_STD(d, d)), name  # 1 / sqrt(d); one Xavier over (3d, d) is 1 / sqrt(2d)
            assert part.abs().max().item() <= math.sqrt(6 / (2 * d)) + 1e-7
        assert close(block.attn.proj.weight.std().item(), XAVIER_STD(d, d))
        assert close(block.mlp[0].weight.std().item(), XAVIER_STD(d, 4 * d)) and close(block.mlp[2].weight.std().item(), XAVIER_STD(4 * d, d))
        assert all((m.bias == 0).all() for m in (block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[2]))
        assert (block.norm1.weight == 1).all() and (block.norm1.bias == 0).all()
    cls = vit.cls_token.detach()
    assert 0 < cls.std().item() < 2e-6 and cls.std().item() > 0.5e-6  # std 1e-6 (the MAE/timm scheme: 0.02)
    convs = [m for m in vit.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:  # torch's default: the authors' code leaves the stem's convolutions as they are built
        fan_in = conv.weight[0].numel()
        assert close(conv.weight.std().item(), TORCH_DEFAULT_STD(fan_in), rel=0.1 if conv.weight.numel() < 5000 else 0.05), (name, conv)


def test_mae_init_of_pici():
    """MAE's models_mae.py initialize_weights, as PICI's code: the patch embedding Xavier over its
    flattened (dim, 3*16*16) kernel (about twice Conv2d's default std); Linear layers Xavier, the fused
    qkv as one matrix; CLS and mask tokens normal with std 0.02; biases 0, LayerNorm (1, 0)."""
    net = NETS["pici"]
    vit, dec = net.backbone, net.decoder
    d = vit.dim
    patch = vit.stem.weight.detach()
    assert close(patch.std().item(), XAVIER_STD(3 * 16 * 16, d))  # 0.042 at d = 384; Conv2d's default: 0.021
    assert not close(patch.std().item(), TORCH_DEFAULT_STD(3 * 16 * 16), rel=0.3)
    for blocks, width in ((vit.blocks, d), (dec.blocks, 512)):
        for block in blocks:
            w = block.attn.qkv.weight.detach()
            assert close(w.std().item(), XAVIER_STD(width, 3 * width))
            for part in w.split(width):  # q, k and v share the fused matrix's spread
                assert close(part.std().item(), XAVIER_STD(width, 3 * width))
            assert (block.attn.qkv.bias == 0).all() and (block.norm2.weight == 1).all()
    assert close(vit.cls_token.std().item(), 0.02, rel=0.15) and close(dec.mask_token.std().item(), 0.02, rel=0.15)
    assert close(dec.embed.weight.std().item(), XAVIER_STD(d, 512)) and close(dec.pred.weight.std().item(), XAVIER_STD(512, 768))
    head = net.instance_head[0].weight  # the heads are built outside the MAE: torch's default, as theirs
    assert close(head.std().item(), TORCH_DEFAULT_STD(d))
