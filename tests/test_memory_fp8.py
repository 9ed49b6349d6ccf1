"""fp8 base weights: per-layer upcast, ComfyUI's scaled fp8 files with their scales, LoRA on top."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamrelation_core.errors import ModelFileError
from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.mochi import fp8
from dreamrelation_core.mochi.dit_keys import diffusers_to_genmo, genmo_to_diffusers
from dreamrelation_core.mochi.loading import load_transformer
from dreamrelation_core.mochi.tiny import tiny_transformer

E4M3 = torch.float8_e4m3fn


def run(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(1, 12, 3, 8, 8, generator=g), torch.randn(1, 16, 32, generator=g)
    ym = torch.ones(1, 16, dtype=torch.bool)
    ym[0, 12:] = False
    return model(x, y, timestep=torch.tensor([300.0]), encoder_attention_mask=ym, return_dict=False)[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_fp8_storage_changes_the_prediction_only_by_the_weight_rounding():
    def fresh():  # same seed, same weights (cheaper than copy.deepcopy, which imports torch.distributed)
        return tiny_transformer(num_layers=3, heads=2, head_dim=48, seed=1)

    ref = fresh()
    q = fp8.freeze_linears(fresh(), E4M3)
    linears = dict(fp8.frozen_linears(q))
    assert len(linears) == len([m for m in ref.modules() if isinstance(m, torch.nn.Linear)])
    assert all(m.weight.dtype == E4M3 and m.scale_weight is not None for m in linears.values())
    assert fp8.storage_bytes(q) * 4 == fp8.storage_bytes(fp8.freeze_linears(fresh()))  # 1 byte vs fp32's 4
    # the rounding itself: e4m3 keeps 3 mantissa bits, so each weight moves by at most 2^-4 of
    # itself (plus half a subnormal step, 2^-10 * scale, for the tiniest ones)
    rounded, weight_err = fresh(), 0.0
    for name, lin in linears.items():
        w, wq = ref.get_submodule(name).weight, lin.dequantized()
        assert ((wq - w).abs() <= w.abs() * 2**-4 + lin.scale_weight * 2**-10 + 1e-12).all(), name
        weight_err = max(weight_err, rel(wq, w))
        rounded.get_submodule(name).weight.copy_(wq)
    out, out_ref, out_rounded = run(q), run(ref), run(rounded)
    # fp8 storage computes exactly the model with fp8-rounded weights (fp32 reassociation only) ...
    assert rel(out, out_rounded) < 1e-5
    # ... and that rounding (measured: 2.6 % per weight matrix) moves the prediction by about as
    # much: measured 3.0-3.5 % for 2-4 blocks; the bound held here is twice the weight error
    assert 0.3 * weight_err < rel(out, out_ref) < 2 * weight_err, (rel(out, out_ref), weight_err)
    assert 0.01 < weight_err < 0.04


def test_lora_on_fp8_base_trains_in_fp32():
    model = fp8.freeze_linears(tiny_transformer(num_layers=2), E4M3)
    triplet.add_triplet(model, rank=4, alpha=4.0)
    lora = triplet.lora_parameters(model)
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for _, p in lora)  # not fp8: peft reads compute_dtype
    to_q = model.transformer_blocks[0].attn1.to_q
    assert isinstance(to_q.base_layer, fp8.FrozenLinear) and to_q.base_layer.weight.dtype == E4M3
    with torch.no_grad():
        for _, p in triplet.lora_parameters(model, "ffn"):
            p.normal_(0, 0.1)
    run(model).square().mean().backward()
    grads = [p.grad for _, p in lora if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(m.weight.grad is None for _, m in fp8.frozen_linears(model))


def test_restore_dtype_and_quantise_from_bf16():
    q = fp8.freeze_linears(tiny_transformer(num_layers=2), E4M3)
    expected = {n: m.dequantized().bfloat16() for n, m in fp8.frozen_linears(q)}
    back = fp8.freeze_linears(q, torch.bfloat16)  # fp8 -> bf16: dequantised with the scale
    for name, lin in fp8.frozen_linears(back):
        assert lin.weight.dtype == torch.bfloat16 and lin.scale_weight is None
        assert torch.equal(lin.weight, expected[name])


# ---------------------------------------------------------------------------------------------
# ComfyUI's scaled fp8 file layout


def write_scaled_fp8(ref, path, scale_input=True):
    """`ref` in ComfyUI's mochi_preview_fp8_scaled layout: every 2-D Linear weight of the DiT in
    e4m3 with `<module>.scale_weight`, the `scaled_fp8` marker; returns the genmo weights the
    file stands for (weight.float() * scale)."""
    sd = diffusers_to_genmo(ref.state_dict(), prefix="model.diffusion_model.")
    out, real = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=E4M3)}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            q, s = fp8.quantize_fp8(v, E4M3)
            module = k[: -len("weight")]
            out[k], out[module + "scale_weight"] = q.contiguous(), s
            if scale_input:
                out[module + "scale_input"] = torch.tensor(1.0)
            real[k] = q.float() * s
        else:
            out[k] = v.contiguous()
            real[k] = v
    save_file(out, str(path))
    return real


def reference_from(real):
    model = tiny_transformer(num_layers=3, text_hidden=48, seed=9)
    model.load_state_dict(genmo_to_diffusers(real))
    return model


@torch.no_grad()
def test_scaled_fp8_file_loads_with_its_scales(tmp_path):
    src = tiny_transformer(num_layers=3, text_hidden=48, seed=2)
    path = tmp_path / "mochi_preview_fp8_scaled.safetensors"
    real = write_scaled_fp8(src, path)
    model = load_transformer(str(path))
    linears = dict(fp8.frozen_linears(model))
    q_lin = linears["transformer_blocks.1.attn1.to_q"]
    assert q_lin.weight.dtype == E4M3 and q_lin.scale_weight is not None
    # q, k and v come from one fused qkv_x tensor with one scale: each part keeps it
    raw = load_file(str(path))
    fused = raw["model.diffusion_model.blocks.1.attn.qkv_x.scale_weight"]
    for part in ("to_q", "to_k", "to_v"):
        assert torch.equal(linears[f"transformer_blocks.1.attn1.{part}"].scale_weight, fused)
    ref = reference_from(real)
    assert rel(run(model), run(ref)) < 1e-5


@torch.no_grad()
def test_wrong_or_missing_scales_are_caught(tmp_path):
    src = tiny_transformer(num_layers=3, text_hidden=48, seed=2)
    good = tmp_path / "good.safetensors"
    ref = reference_from(write_scaled_fp8(src, good))
    expected = run(ref)
    raw = load_file(str(good))
    # one scale off by a factor 2: the prediction no longer matches the file's real weights
    wrong = dict(raw)
    wrong["model.diffusion_model.blocks.0.mlp_x.w1.scale_weight"] = raw["model.diffusion_model.blocks.0.mlp_x.w1.scale_weight"] * 2
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    assert rel(run(load_transformer(str(tmp_path / "wrong.safetensors"))), expected) > 1e-3
    # scales ignored (keys dropped): far off too, so a loader that skipped them would fail the test above
    unscaled = {k: v for k, v in raw.items() if not k.endswith("scale_weight")}
    save_file(unscaled, str(tmp_path / "unscaled.safetensors"))
    assert rel(run(load_transformer(str(tmp_path / "unscaled.safetensors"))), expected) > 1e-1
    # a scale whose weight is not fp8, and one without a weight: clear errors
    bad = dict(raw)
    bad["model.diffusion_model.blocks.0.mod_x.weight"] = bad["model.diffusion_model.blocks.0.mod_x.weight"].float()
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFileError, match=r"bad.safetensors.*blocks.0.mod_x.scale_weight.*not fp8"):
        load_transformer(str(tmp_path / "bad.safetensors"))
    orphan = dict(raw)
    orphan["model.diffusion_model.blocks.0.extra.scale_weight"] = torch.tensor(1.0)
    save_file(orphan, str(tmp_path / "orphan.safetensors"))
    with pytest.raises(ModelFileError, match="extra.scale_weight has no weight"):
        load_transformer(str(tmp_path / "orphan.safetensors"))


# ---------------------------------------------------------------------------------------------
# memory of one fp8 Linear: no output-sized temporaries


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of every new storage an op returns (in-place results and views are not new)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((str(func), t.untyped_storage().nbytes()))
        return out


def test_fp8_linear_forward_backward_allocates_only_output_weight_and_input_grad():
    """Mochi's feed-forward input projection (ff.net.0.proj: 3072 -> 2 x 8192), with a bias (as
    the modulation Linears have), at 64 tokens: forward allocates the upcast weight and the output,
    backward the upcast weight and the input gradient; nothing else bigger than 64 KiB. (Before:
    `y * scale`, `y + bias` and `grad * scale` each made an output-sized copy.)"""
    tokens, d_in, d_out = 64, 3072, 2 * 8192
    g = torch.Generator().manual_seed(0)
    lin = fp8.FrozenLinear.from_weight(torch.randn(d_out, d_in, generator=g) / d_in**0.5,
                                       torch.randn(d_out, generator=g), E4M3)
    x = torch.randn(1, tokens, d_in, generator=g, requires_grad=True)
    grad_y = torch.randn(1, tokens, d_out, generator=g)
    weight, out, dx = d_in * d_out * 4, tokens * d_out * 4, tokens * d_in * 4  # fp32 on the CPU
    fwd, bwd = _Allocations(), _Allocations()
    with fwd:
        y = lin(x)
    with bwd:
        y.backward(grad_y)
    big = 64 * 1024
    assert sorted(n for _, n in fwd.sizes if n > big) == sorted([weight, out]), fwd.sizes
    assert sorted(n for _, n in bwd.sizes if n > big) == sorted([weight, dx]), bwd.sizes
    # and the math: the scaled fp8 weight and the bias, exactly as dequantised
    w = lin.dequantized()
    assert torch.allclose(y, x.detach() @ w.T + lin.bias, rtol=1e-5, atol=1e-4)
    assert torch.allclose(x.grad, grad_y @ w, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# loading without a second copy


def _model_bytes(model) -> int:
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _load_peak(fn):
    from dreamrelation_core.training.memory.trace import LiveBytes

    counter = LiveBytes(device_type="cpu")
    with counter:
        model = fn()
    return model, counter.peak


@torch.no_grad()
def test_loading_holds_about_one_model(tmp_path):
    """The genmo loader's peak of live CPU tensors is the model it returns plus one tensor's
    temporaries: a bf16 file is quantised to fp8 while it is read (before: the whole bf16 model,
    then fp8 beside it), and the SwiGLU halves are swapped in place (before: a copy of each)."""
    src = tiny_transformer(num_layers=12, heads=4, head_dim=64, text_hidden=128, seed=4)
    genmo = {k: v.to(torch.bfloat16).contiguous() for k, v in diffusers_to_genmo(src.state_dict(), "model.diffusion_model.").items()}
    save_file(genmo, str(tmp_path / "bf16.safetensors"))
    largest = max(v.numel() for k, v in genmo.items() if k.endswith(".weight") and v.ndim == 2)
    bf16_model = sum(v.numel() * 2 for v in genmo.values())

    model, peak = _load_peak(lambda: load_transformer(str(tmp_path / "bf16.safetensors"), dtype=torch.bfloat16,
                                                      linear_dtype=E4M3))
    final = _model_bytes(model)
    assert all(m.weight.dtype == E4M3 for _, m in fp8.frozen_linears(model))
    assert final < 0.6 * bf16_model
    # the largest weight read in bf16, its fp32 copy and two more fp32 temporaries of the quantisation
    assert peak <= final + largest * (2 + 3 * 4) + 64 * 1024, (peak, final, largest)
    # the way it went before (load in bf16, then re-store in fp8) peaks at the bf16 model
    _, old_peak = _load_peak(lambda: fp8.freeze_linears(load_transformer(str(tmp_path / "bf16.safetensors"),
                                                                         dtype=torch.bfloat16), E4M3))
    assert old_peak >= bf16_model > peak
    # same weights up to fp8 rounding (per tensor of genmo's layout: q, k, v share their fused scale)
    for name, lin in fp8.frozen_linears(model):
        ref = src.get_submodule(name).weight.to(torch.bfloat16).float()
        assert rel(lin.dequantized(), ref) < 0.05, name

    # a scaled fp8 file: the model is the file's tensors; the half swap costs one half, not a copy
    write_scaled_fp8(src, tmp_path / "fp8.safetensors", scale_input=False)
    model, peak = _load_peak(lambda: load_transformer(str(tmp_path / "fp8.safetensors"), dtype=torch.bfloat16))
    rows = sum(v.shape[0] for k, v in genmo.items() if k.endswith(".weight") and v.ndim == 2)
    # + the scales carried through the key converter: one fp32 value per weight row (a few MB for Mochi)
    assert peak <= _model_bytes(model) + largest // 2 + 5 * rows + 64 * 1024


@torch.no_grad()
def test_trainer_with_base_dtype_fp8_quantises_a_bf16_file_while_reading(tmp_path):
    """`base_dtype: fp8` reaches the loader: a bf16 genmo file's Linears arrive in fp8 and the load
    never holds the whole bf16 model (auto and bf16 still load the file's own precision)."""
    from dreamrelation_core.training.config import TrainConfig
    from dreamrelation_core.training.trainer import load_transformer as trainer_load

    src = tiny_transformer(num_layers=4, heads=4, head_dim=64, text_hidden=128, seed=5)
    genmo = {k: v.to(torch.bfloat16).contiguous() for k, v in diffusers_to_genmo(src.state_dict(), "model.diffusion_model.").items()}
    path = tmp_path / "mochi_bf16.safetensors"
    save_file(genmo, str(path))
    bf16_model = sum(v.numel() * 2 for v in genmo.values())

    model, peak = _load_peak(lambda: trainer_load(TrainConfig(transformer=str(path), base_dtype="fp8"), torch.bfloat16))
    assert all(m.weight.dtype == E4M3 for _, m in fp8.frozen_linears(model))
    assert peak < bf16_model, (peak, bf16_model)
    for base_dtype in ("auto", "bf16"):
        kept = trainer_load(TrainConfig(transformer=str(path), base_dtype=base_dtype), torch.bfloat16)
        weights = [t for t in kept.state_dict().values() if t.ndim == 2]
        assert weights and not any(fp8.is_fp8(t.dtype) for t in weights), base_dtype
