"""Extending the library in one place: a head registered once works wherever a head is named, and a CovPool
option declared once is accepted, checked, shown, unpickled and passed through everywhere."""
import dataclasses
import inspect
import io

import pytest
import timm
import torch
from torch import nn

import covpool
from covpool.layers import _options, heads
from covpool.linalg._checks import check_int
from covpool.testing import rel

F64 = torch.float64


@pytest.fixture
def registry(monkeypatch):
    """The head registry as it is, restored after the test (a registered name stays registered otherwise)."""
    monkeypatch.setattr(heads, "_HEADS", dict(heads._HEADS))
    return heads._HEADS


def _train_step(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def test_a_head_registered_in_one_place_works_wherever_a_head_is_named(registry):
    # The one place: an uncentred second moment, its square root by MPA-Lya, the full matrix, signed √ and ℓ2.
    head = covpool.register_head("mpa_bcnn", options={"centered": False, "backend": "mpa_lya", "vectorize": "full",
                                                      "signed_sqrt": True, "l2": True},
                                 paper="an example", doc="second moment, MPA-Lya root, full matrix, signed √, l2")
    assert covpool.get_head("mpa_bcnn") is head and covpool.list_heads()[-1] == "mpa_bcnn"
    assert head.uses_backend and not head.tokens_only and head.keywords == covpool.get_head("bcnn").keywords
    with pytest.raises(ValueError, match="head 'mpa_bcnn' is already registered"):
        covpool.register_head("mpa_bcnn")
    with pytest.raises(ValueError, match="unknown head 'nope'; valid heads are: .*, sot, mpa_bcnn$"):
        covpool.get_head("nope")
    with pytest.raises(TypeError, match="'centred' \\(did you mean 'centered'\\?\\)"):
        covpool.register_head("typo", options={"centred": False})

    # build_head: the formula, in float64, on features without a reduction.
    x = torch.rand(2, 6, 9, dtype=F64, generator=torch.Generator().manual_seed(0)) + 0.1
    pool = covpool.build_head("mpa_bcnn", 6, reduced_dim=None, backend="eig", dtype=F64)
    lam, v = torch.linalg.eigh(x @ x.mT / 9)
    z = ((v * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ v.mT).flatten(1)
    z = z.sign() * z.abs().sqrt()
    assert rel(pool(x.unsqueeze(-1)), z / (z.square().sum(-1, keepdim=True) + 1e-10).sqrt()) < 1e-6

    # swap_pooling on a timm CNN, one training step, set_backend (it has a root), the head rebuilt by name.
    torch.manual_seed(0)
    model = covpool.swap_pooling(timm.create_model("resnet18", num_classes=3), head="mpa_bcnn", reduced_dim=8)
    assert model.global_pool.backend == "mpa_lya" and model.head_hidden_size == 64
    assert torch.isfinite(_train_step(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 2])))
    assert covpool.set_backend(model, "ns") == {"global_pool": "mpa_lya"} and model.global_pool.backend == "ns"
    model.reset_classifier(0, "")
    model.reset_classifier(4)
    assert model.global_pool.backend == "mpa_lya" and model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    # ... and on a transformer's tokens, and in SoViTHead.
    vit = covpool.swap_pooling(timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32),
                               head="mpa_bcnn", reduced_dim=4)
    assert vit.head_hidden_size == 192 + 16 and vit(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert covpool.SoViTHead(16, 3, reduced_dim=4, head="mpa_bcnn").pool.backend == "mpa_lya"


class CovarianceDiagonal(nn.Module):
    """A pooling module of a user's: each channel's variance over the positions, of maps or tokens."""

    def __init__(self, in_channels, scale=1.0, *, layout="auto", device=None, dtype=None):
        super().__init__()
        self.in_channels, self.scale, self.layout = in_channels, scale, layout
        self.out_features = in_channels

    def forward(self, x):
        feats = x.flatten(2) if x.dim() == 4 else x.mT
        return self.scale * feats.var(-1, unbiased=False)


def test_a_head_with_a_module_of_its_own(registry):
    covpool.register_head("variance", CovarianceDiagonal, {"scale": 2.0}, paper="an example")
    head = covpool.get_head("variance")
    assert head.keywords == ["scale", "layout", "device", "dtype"] and not head.uses_backend
    x = torch.randn(2, 5, 3, 3)
    pool = covpool.build_head("variance", 5)
    assert type(pool) is CovarianceDiagonal and torch.allclose(pool(x), 2 * x.flatten(2).var(-1, unbiased=False))
    with pytest.raises(TypeError, match="'scal' \\(did you mean 'scale'\\?\\); valid: scale, layout, device, dtype"):
        covpool.build_head("variance", 5, scal=3.0)
    torch.manual_seed(0)
    model = covpool.swap_pooling(timm.create_model("resnet18", num_classes=3), head="variance", scale=0.5)
    assert model.head_hidden_size == 512 and model.global_pool.scale == 0.5
    assert torch.isfinite(_train_step(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 2])))
    model.reset_classifier(0, "")
    model.reset_classifier(4)
    assert type(model.global_pool) is CovarianceDiagonal and model.global_pool.scale == 0.5
    with pytest.raises(ValueError, match="already uses covariance pooling"):
        covpool.swap_pooling(model)
    with pytest.raises(ValueError, match="has no matrix square root: backend='ns' does not apply"):
        covpool.SoViTHead(5, head="variance", backend="ns")


def test_a_covpool_option_declared_in_one_place_works_end_to_end(monkeypatch):
    fresh = covpool.CovPool(8, 4)  # built, and pickled below, before the option exists
    saved = io.BytesIO()
    torch.save(fresh, saved)

    @dataclasses.dataclass(frozen=True)
    class WithBins(covpool.CovPool.options_class):  # the one place: a field, its default, check and reader
        bins: int = _options.option(3, lambda name, value: check_int(name, value, 2),
                                    read_when=lambda o: o["sketch"] is None, needs="no sketch")

    monkeypatch.setattr(covpool.CovPool, "options_class", WithBins)
    pool = covpool.CovPool(8, 4, bins=5)
    assert pool.bins == 5 and pool.options["bins"] == 5 and "bins=5" in repr(pool)
    assert covpool.CovPool(8, 4).bins == 3 and "bins" not in covpool.CovPool(8, 4).extra_repr()
    assert "bins" in inspect.signature(covpool.CovPool).parameters
    assert covpool.CovPool(8, **pool.options).bins == 5
    with pytest.raises(ValueError, match="bins must be an integer >= 2, got 1"):
        covpool.CovPool(8, 4, bins=1)
    with pytest.raises(TypeError, match="'bnis' \\(did you mean 'bins'\\?\\)"):
        covpool.CovPool(8, 4, bnis=5)
    with pytest.raises(ValueError, match="bins=5 would have no effect: bins needs no sketch"):
        covpool.CovPool(8, 4, normalization="none", sketch="tensor", sketch_dim=16, bins=5)
    saved.seek(0)
    old = torch.load(saved, weights_only=False)
    assert old.bins == 3 and old.options["bins"] == 3  # pickled without it: its default
    # Every head on CovPool takes it by name, through build_head and swap_pooling.
    assert "bins" in covpool.get_head("isqrt_cov").keywords
    assert covpool.build_head("bcnn", 8, reduced_dim=4, bins=4).bins == 4
    model = covpool.swap_pooling(timm.create_model("resnet18", num_classes=3), bins=6, reduced_dim=8)
    assert model.global_pool.bins == 6
    model.reset_classifier(0, "")
    model.reset_classifier(2)
    assert model.global_pool.bins == 6


def test_covpool_declares_the_type_of_every_option_for_the_type_checker():
    # CovPool sets each option as an attribute of its own name from CovPoolOptions; mypy reads their types from
    # CovPool's class annotations, so a new field needs its line there too (its default and check stay the field's).
    fields = {f.name for f in dataclasses.fields(covpool.CovPool.options_class)}
    assert fields <= set(covpool.CovPool.__annotations__), fields - set(covpool.CovPool.__annotations__)


def test_sovithead_options_type_names_its_keyword_options():
    from covpool.layers._common import SoViTHeadOptions

    params = inspect.signature(covpool.SoViTHead).parameters
    assert set(SoViTHeadOptions.__annotations__) == set(params) - {"embed_dim", "num_classes", "device", "dtype",
                                                                   "kind"}


class NoWidth(nn.Module):
    """A pooling module without the ``out_features`` a head's module must have."""

    def __init__(self, in_channels, reduced_dim=None, *, layout="tokens", device=None, dtype=None):
        super().__init__()

    def forward(self, x):
        return x.mean(1)


def test_a_head_module_without_an_integer_width_is_a_clear_error(registry):
    covpool.register_head("no_width", NoWidth, layouts=("tokens",), paper="an example")
    with pytest.raises(TypeError, match=r"SoViTHead\(head='no_width'\) needs a pooling module with an integer "
                                        r"out_features .*got NoWidth with out_features=None"):
        covpool.SoViTHead(8, 3, reduced_dim=None, head="no_width")
