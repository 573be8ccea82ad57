"""The UNet and classifier: official checkpoint layouts, golden forward pass, attention paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guided_diffusion import attention
from guided_diffusion.nn import CheckpointFunction
from guided_diffusion.script_util import (
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.unet import (
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    UNetModel,
    count_flops_attn,
    set_attention_impl,
)

from conftest import GOLDEN, load_json

LAYOUTS = load_json("adm_checkpoint_layouts.json")["configs"]


def _build(config):
    flags = dict(config["flags"])
    flags.pop("eps_scaler", None)  # the original's default 0.0; not a model flag
    with torch.device("meta"):  # shapes only: no memory for 500M parameters
        if config["builder"] == "create_classifier":
            return create_classifier(**flags)
        return create_model_and_diffusion(**flags)[0]


@pytest.mark.parametrize("config", LAYOUTS, ids=[c["name"] for c in LAYOUTS])
def test_official_checkpoint_layout(config):
    model = _build(config)
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    want = [(k, list(s)) for k, s in config["state_dict"]]
    assert len(got) == config["num_state_dict_entries"]
    assert got == want  # same keys, same order, same shapes
    assert sum(int(np.prod(s)) for _, s in got) == config["num_params"]


@pytest.mark.parametrize("config", LAYOUTS, ids=[c["name"] for c in LAYOUTS])
def test_official_layout_survives_fp16_conversion(config):
    model = _build(config)
    keys = list(model.state_dict())
    model.convert_to_fp16()
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("impl", ["auto", "sdpa", "einsum"])
def test_golden_forward(golden_model, impl):
    f = np.load(GOLDEN / "forward.npz")
    set_attention_impl(golden_model, impl)
    try:
        with torch.no_grad():
            out = golden_model(torch.from_numpy(f["x"]), torch.from_numpy(f["t"])).numpy()
    finally:
        set_attention_impl(golden_model, "auto")
    assert out.shape == f["out"].shape
    np.testing.assert_allclose(out, f["out"], rtol=1e-5, atol=1e-5)


def test_golden_model_rejects_wrong_flags(golden_flags):
    flags = dict(golden_flags, num_channels=64)
    model, _ = create_model_and_diffusion(**flags)
    state = torch.load(GOLDEN / "model.pt", map_location="cpu", weights_only=True)
    with pytest.raises(RuntimeError):
        model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("cls", [QKVAttention, QKVAttentionLegacy])
@pytest.mark.parametrize("heads,ch,length", [(1, 8, 5), (4, 16, 64), (3, 32, 17)])
def test_sdpa_equals_einsum(cls, heads, ch, length):
    g = torch.Generator().manual_seed(heads * 100 + ch)
    qkv = torch.randn(2, 3 * heads * ch, length, generator=g) * 2
    a = cls(heads, "einsum")(qkv)
    b = cls(heads, "sdpa")(qkv)
    assert a.shape == (2, heads * ch, length)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [QKVAttention, QKVAttentionLegacy])
def test_cpu_chunked_attention_equals_einsum(cls, monkeypatch):
    """'auto' on a CPU attends in chunks of heads; 5 heads of 17x17 weights in chunks of 2."""
    monkeypatch.setattr(attention, "CPU_ATTENTION_CHUNK_BYTES", 2 * 17 * 17 * 4)
    qkv = torch.randn(1, 3 * 5 * 8, 17, generator=torch.Generator().manual_seed(1)) * 2
    torch.testing.assert_close(cls(5, "auto")(qkv), cls(5, "einsum")(qkv), rtol=1e-5, atol=1e-5)


def test_head_orders_differ():
    """The two layouts split qkv differently: a test that would catch swapping them."""
    qkv = torch.randn(1, 3 * 2 * 4, 6, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(QKVAttention(2)(qkv), QKVAttentionLegacy(2)(qkv))


def test_golden_classifier_forward_matches_guidance_logits(golden_classifier, guidance_npz):
    g = guidance_npz
    x = torch.from_numpy(g["x_t"])
    t = torch.full((x.shape[0],), int(g["p_sample_t_original"]))
    with torch.no_grad():
        logits = golden_classifier(x, t).numpy()
    np.testing.assert_allclose(logits, g["p_sample_classifier_logits"], rtol=1e-5, atol=1e-5)


def test_unknown_attention_impl_is_refused(golden_model):
    with pytest.raises(ValueError, match="attention_impl"):
        set_attention_impl(golden_model, "flash")


def test_class_cond_requires_labels():
    model, _ = create_model_and_diffusion(
        image_size=16,
        class_cond=True,
        learn_sigma=False,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        attention_resolutions="8",
        dropout=0.0,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        num_classes=7,
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class labels"):
        model(x, t)
    assert model(x, t, y=torch.tensor([0, 6])).shape == (2, 3, 16, 16)
    assert model.label_emb.num_embeddings == 7


def _flags(**kw):
    flags = model_and_diffusion_defaults()
    flags.update(num_channels=32, num_res_blocks=1, num_head_channels=16, **kw)
    return flags


def test_image_size_not_divisible_by_the_levels_is_refused():
    """33 cannot be halved 3 times and doubled back (it crashed in torch.cat in forward)."""
    flags = _flags(image_size=33, channel_mult="1,2,2,2", attention_resolutions="8")
    msg = (
        r"^--image_size 33 is not divisible by 8 \(4 resolution levels of channel_mult "
        r"1,2,2,2\): use a multiple of 8 such as 32$"
    )
    with pytest.raises(ValueError, match=msg):
        create_model_and_diffusion(**flags)
    with pytest.raises(ValueError, match="--image_size 6 is not divisible by 4 .* such as 4$"):
        UNetModel(6, 3, 32, 3, 1, (), channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="--image_size 20 is not divisible by 8"):
        EncoderUNetModel(20, 3, 32, 10, 1, (), channel_mult=(1, 2, 2, 2), pool="attention")
    # sizes that divide work, also when they are not a power of two
    model, _ = create_model_and_diffusion(**dict(flags, image_size=24))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 24, 24), torch.tensor([3])).shape == (1, 3, 24, 24)
    # the convolutional pools take any size (no skip concatenation, no positional embedding)
    clf = EncoderUNetModel(20, 3, 32, 10, 1, (), channel_mult=(1, 2, 2, 2), pool="adaptive")
    with torch.no_grad():
        assert clf(torch.randn(1, 3, 20, 20), torch.tensor([3])).shape == (1, 10)


class _Counted(torch.nn.Module):
    """What thop attaches to every module it profiles."""

    def __init__(self):
        super().__init__()
        self.total_ops = torch.zeros(1, dtype=torch.float64)


@pytest.mark.parametrize("cls", [QKVAttention, QKVAttentionLegacy])
def test_count_flops_attn_is_the_originals_thop_counter(cls):
    """As a thop hook (module, inputs, output): the original counts from output[0]."""
    qkv = torch.randn(3, 3 * 2 * 4, 5)
    y = cls(2)(qkv)  # (3, 8, 5): y[0] is (8, 5), so b = 8, c = 5, no spatial dims
    counted = _Counted()
    cls.count_flops(counted, (qkv,), y)
    assert counted.total_ops.dtype == torch.float64
    assert counted.total_ops.tolist() == [2 * 8 * 1**2 * 5]
    count_flops_attn(counted, (qkv,), torch.zeros(2, 3, 4, 5))  # b 3, c 4, 5 positions
    assert counted.total_ops.tolist() == [80 + 2 * 3 * 5**2 * 4]


def test_checkpoint_function_gradients_and_recomputation():
    """CheckpointFunction.apply(func, n_inputs, *inputs, *params), the original's interface."""
    calls = []
    w = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)

    def func(x):
        calls.append(1)
        return torch.sin(x) * w

    x = torch.tensor([0.1, 1.2, -0.7], requires_grad=True)
    out = CheckpointFunction.apply(func, 1, x, w)
    torch.testing.assert_close(out, torch.sin(x) * w)
    out.sum().backward()
    assert len(calls) == 2  # the forward, then the recomputation in backward
    torch.testing.assert_close(x.grad, torch.cos(x.detach()) * w.detach())
    torch.testing.assert_close(w.grad, torch.sin(x.detach()))
