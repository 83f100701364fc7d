"""Each method's augmentation recipe, checked by sampling: the views' random parameters are drawn as
training draws them, and their frequencies and ranges must be the paper's values (written out
below from the papers, not read from the method files); and `--recipe authors` changes exactly the
settings where the authors' public code departs from the paper."""
import dataclasses

import pytest
import torch

import cc
import common
import data
import dcsc
import pici
import vitic
import vtcc

N = 10000  # samples per check: a frequency is within 0.02 of its probability (4 standard deviations at p 0.5)

# What each view must do, from the papers (and, where a paper gives no value, from the authors' code
# as the method file says). crop = RandomResizedCrop area scale (None: the whole image);
# jitter = ColorJitter (brightness, contrast, saturation, hue) strengths.
SIMCLR = lambda s, blur: dict(crop=(0.08, 1.0), flip=0.5, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), p_jitter=0.8,
                              p_grey=0.2, p_blur=blur, sigma=(0.1, 2.0), p_solarize=0.0, norm=None)
BYOL = lambda blur, solarize: dict(crop=(0.08, 1.0), flip=0.5, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_grey=0.2,
                                   p_blur=blur, sigma=(0.1, 2.0), p_solarize=solarize, norm=data.IMAGENET)
WHOLE = dict(crop=None, flip=0.0, jitter=(0.0, 0.0, 0.0, 0.0), p_jitter=0.0, p_grey=0.0, p_blur=0.0, sigma=None,
             p_solarize=0.0, norm=data.IMAGENET)
EXPECTED = [
    # CC paper, Sec. 3.1 and 4.1.2 (no blur on the small-image datasets); DCSC paper, Sec. 4.2: CC's
    *[(m, "paper", "cifar10", [SIMCLR(0.5, 0.0)] * 2) for m in (cc, dcsc)],
    *[(m, "paper", "stl10", [SIMCLR(1.0, 0.0)] * 2) for m in (cc, dcsc)],
    *[(m, "paper", "imagenet10", [SIMCLR(1.0, 0.5)] * 2) for m in (cc, dcsc)],
    (cc, "paper", "tiny-imagenet", [SIMCLR(0.5, 0.0)] * 2),
    (dcsc, "paper", "rsod", [SIMCLR(1.0, 0.5)] * 2),
    # VTCC paper, Sec. III-A: BYOL's asymmetric views; the authors' code blurs both with p 1.0
    (vtcc, "paper", "rsod", [BYOL(1.0, 0.0), BYOL(0.1, 0.2)]),
    (vtcc, "authors", "rsod", [BYOL(1.0, 0.0), BYOL(1.0, 0.2)]),
    # ViT-IC: the author's code's strengths in both recipes
    *[(vitic, r, "cifar10", [BYOL(0.8, 0.0), BYOL(0.8, 0.2)]) for r in ("paper", "authors")],
    # PICI paper, Sec. 3.1 and 4.1: weak = the whole image resized; strong = the authors' weak/strong transform;
    # the authors' training script: two strong BYOL views
    (pici, "paper", "rsod", [WHOLE, BYOL(1.0, 0.0)]),
    (pici, "authors", "rsod", [BYOL(1.0, 0.0), BYOL(1.0, 0.2)]),
]


def check_by_sampling(view, want, seed):
    """Draw N parameter sets of `view` (a 90 x 120 image) and compare them with the values in `want`."""
    g = torch.Generator().manual_seed(seed)
    q = data.sample_view(N, 90, 120, g, view)
    for key, p in [("flip", "flip"), ("jitter", "p_jitter"), ("gray", "p_grey"), ("blur", "p_blur"), ("solarize", "p_solarize")]:
        assert abs(q[key].float().mean().item() - want[p]) < 0.02, (key, want[p])
    area = (q["boxes"][:, 2] * q["boxes"][:, 3]).double() / (90 * 120)
    if want["crop"] is None:
        assert (area == 1).all() and not view.random  # the whole image, nothing drawn at all
        return
    lo, hi = want["crop"]
    assert lo - 0.01 <= area.min() <= lo + 0.01 and area.max() >= hi - 0.02 and area.max() <= 1.0
    strengths = torch.tensor(want["jitter"])
    low = torch.cat([(1 - strengths[:3]).clamp(min=0), -strengths[3:]])
    high = torch.cat([1 + strengths[:3], strengths[3:]])
    f = q["factors"]
    assert (f.min(0).values >= low - 1e-6).all() and (f.max(0).values <= high + 1e-6).all()
    assert (f.min(0).values - low).abs().max() < 0.01 and (f.max(0).values - high).abs().max() < 0.01  # the whole range is used
    assert abs(q["sigma"].min().item() - want["sigma"][0]) < 0.01 and abs(q["sigma"].max().item() - want["sigma"][1]) < 0.01


@pytest.mark.parametrize("method,name,dataset,views", EXPECTED,
                         ids=[f"{m.__name__}-{r}-{d}" for m, r, d, _ in EXPECTED])
def test_recipe_by_sampling(method, name, dataset, views):
    recipe = method.recipe(name, dataset)["views"]
    assert len(recipe) == 2
    for k, (view, want) in enumerate(zip(recipe, views)):
        check_by_sampling(view, want, seed=k)
        assert view.norm == want["norm"]
    # the normalisation as applied: a white image through the eval transform
    white = torch.full((2, 3, 40, 40), 255, dtype=torch.uint8)
    out = data.Augmentation(recipe, 32).eval(white)
    expected = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD) if views[0]["norm"] else torch.ones(3)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), expected.float(), atol=1e-4, rtol=0)


def differences(method, dataset):
    """{(part, field): (paper value, authors value)} over everything a recipe sets."""
    paper, authors = method.recipe("paper", dataset), method.recipe("authors", dataset)
    assert paper.keys() == authors.keys()
    out = {}
    for key in paper:
        if key == "views":
            for k, (a, b) in enumerate(zip(paper[key], authors[key])):
                for f in dataclasses.fields(a):
                    if getattr(a, f.name) != getattr(b, f.name):
                        out[("ab"[k], f.name)] = (getattr(a, f.name), getattr(b, f.name))
        elif paper[key] != authors[key]:
            out[(key,)] = (paper[key], authors[key])
    return out


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet10", "rsod"])
def test_authors_recipe_changes_exactly_the_listed_settings(dataset):
    # CC's code is its paper; DCSC has no public code: the same recipe
    assert differences(cc, dataset) == {} and differences(dcsc, dataset) == {}
    # VTCC: the code blurs the second view with p 1.0, not BYOL's 0.1
    assert differences(vtcc, dataset) == {("b", "p_blur"): (0.1, 1.0)}
    # ViT-IC: the code's instance features are not L2-normalised
    assert differences(vitic, dataset) == {("normalize",): (True, False)}
    # PICI: the training script's two strong BYOL views (view a was the whole image, view b gains solarize);
    # fixed sin-cos positions (models_mae.py); CLI (cross_level_interaction.py, train_pici.py): pseudo-labels
    # once, at the first boosting epoch, from the features of masked inputs, min-max scaled per batch,
    # k-means with 100 inits, renamed batch by batch, CrossEntropyLoss on the softmax output; boosting
    # in one order drawn once (its sampler), the last partial batch dropped
    weak, strong = pici.recipe("paper", dataset)["views"]
    assert differences(pici, dataset) == {
        ("a", "crop"): (None, (0.08, 1.0)), ("a", "flip"): (0.0, 0.5), ("a", "jitter"): ((0.0,) * 4, (0.4, 0.4, 0.2, 0.1)),
        ("a", "p_jitter"): (0.0, 0.8), ("a", "p_grey"): (0.0, 0.2), ("a", "p_blur"): (0.0, 1.0), ("b", "p_solarize"): (0.0, 0.2),
        ("positions",): ("learnable", "fixed"), ("relabel",): ("every epoch", "once"), ("masked",): (False, True),
        ("minmax",): (False, True), ("kmeans_inits",): (10, 100), ("match",): ("dataset", "batch"),
        ("softmax_twice",): (False, True), ("boost_order",): ("reshuffled", "fixed")}
    assert pici.recipe("authors", dataset)["views"][0] == strong


def test_recipes_by_dataset():
    """CC and DCSC set the colour strength and the blur per dataset; a folder of images gets the full recipe."""
    for method in (cc, dcsc):
        for dataset, s, blur in [("cifar100", 0.5, 0.0), ("digits", 1.0, 0.0), ("imagenet-dogs", 1.0, 0.5), ("shapes", 1.0, 0.5)]:
            view = method.recipe("paper", dataset)["views"][0]
            assert view.jitter == pytest.approx((0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)) and view.p_blur == blur, (method, dataset)
    for method in (vtcc, vitic, pici):  # one recipe for every dataset
        assert method.recipe("paper", "cifar10") == method.recipe("paper", "rsod")


@pytest.mark.parametrize("method", [cc, vtcc, vitic, pici, dcsc], ids=lambda m: m.__name__)
def test_every_script_has_the_recipe_flag_with_the_paper_as_default(method):
    args = method.Args()
    assert args.recipe == "paper"
    assert common.parse_args(method.Args, ["--recipe", "authors"]).recipe == "authors"
    with pytest.raises(SystemExit):
        common.parse_args(method.Args, ["--recipe", "mine"])
