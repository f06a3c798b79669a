"""tokenizer.py against the official LlamaGen-style VQ (fixtures in tests/fixtures) and its invariants."""

import json
import math
import os
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

import tokenizer
from data import make_builtin_dataset, run_script
from tokenizer import (VQ_PRESETS, Conv2d, VQConfig, VQModel, evaluate_tokenizer, images_to_tensor, infer_vq_config,
                       main, make_tokenizer_optimizers, tensor_to_images, train_tokenizer)

FIXTURES = Path(__file__).parent / "fixtures"
REF = np.load(FIXTURES / "vq_tiny_reference.npz")
REF_CONFIG = VQConfig(**json.loads(str(REF["config"])))
# A very small tokenizer for fast tests: 4x downsampling, 64 codes.
TINY = VQConfig(codebook_size=64, codebook_embed_dim=4, z_channels=8, ch=8, ch_mult=(1, 2, 2),
                encoder_num_res_blocks=1, decoder_num_res_blocks=1, norm_groups=4)


@pytest.fixture(scope="module")
def official():
    """The official tiny VQ (random weights) in eval mode."""
    return VQModel.from_checkpoint(str(FIXTURES / "vq_tiny_official.pt"), REF_CONFIG).eval()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return VQModel(TINY).eval()


def random_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# -----------------------------------------------------------------------------
# Parity with the official implementation

def test_codes_match_official(official):
    """encode() picks exactly the official nearest codes for the fixture images."""
    codes = official.encode(torch.from_numpy(REF["images"]))
    assert codes.dtype == torch.int64, f"codes dtype {codes.dtype}"
    assert torch.equal(codes, torch.from_numpy(REF["codes"])), \
        f"{int((codes != torch.from_numpy(REF['codes'])).sum())} codes differ from the official ones"


def test_latents_and_decoding_match_official(official):
    """Code lookup gives the official quantised latents, and the decoder the official images (1e-4)."""
    codes = torch.from_numpy(REF["codes"])
    with torch.no_grad():
        latents = official.codes_to_latents(codes)
        decoded = official.decode_latents(latents)
    latent_diff = (latents - torch.from_numpy(REF["quant"])).abs().max().item()
    decoded_diff = (decoded - torch.from_numpy(REF["decoded"])).abs().max().item()
    assert latent_diff < 1e-5, f"quantised latents differ by {latent_diff}"
    assert decoded_diff < 1e-4, f"decoded images differ by {decoded_diff}"
    clamped = official.decode(codes)
    assert (decoded.abs() > 1).any(), "the fixture's decodes stay inside [-1, 1]: the clamp goes untested"
    assert torch.equal(clamped, decoded.clamp(-1, 1)), "decode() is not the clamped decoder output"


def test_vq16_state_dict_matches_released_checkpoint():
    """VQ-16 has exactly the keys, shapes and parameter count of LlamaGen's vq_ds16_c2i.pt (built on meta)."""
    expected = json.loads((FIXTURES / "checkpoint_keys.json").read_text())
    with torch.device("meta"):
        vq = VQModel(VQ_PRESETS["VQ-16"])
    shapes = {k: list(v.shape) for k, v in vq.state_dict().items()}
    missing = sorted(expected["VQ-16"].keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected["VQ-16"].keys())
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    wrong = [k for k in shapes if shapes[k] != expected["VQ-16"][k]]
    assert not wrong, f"wrong shapes: {wrong[:5]}"
    n_params = sum(p.numel() for p in vq.parameters())
    assert n_params == expected["VQ-16 params"], f"{n_params} parameters, expected {expected['VQ-16 params']}"
    assert vq.downsample == 16, f"VQ-16 downsamples by {vq.downsample}"


def test_a_checkpoint_without_config_gets_the_architecture_its_weights_show():
    """LlamaGen's files hold no config: VQ-16 is recognised from the released key shapes alone, and
    the official tiny fixture (another width, depth and codebook) loads without being told its
    config and picks the official codes."""
    expected = json.loads((FIXTURES / "checkpoint_keys.json").read_text())["VQ-16"]
    released = {key: torch.empty(shape, device="meta") for key, shape in expected.items()}
    assert infer_vq_config(released) == VQ_PRESETS["VQ-16"], f"inferred {infer_vq_config(released)}"
    vq = VQModel.from_checkpoint(str(FIXTURES / "vq_tiny_official.pt")).eval()
    assert vq.config == REF_CONFIG, f"inferred {vq.config}"
    assert torch.equal(vq.encode(torch.from_numpy(REF["images"])), torch.from_numpy(REF["codes"])), \
        "the codes differ from the official tokenizer's"


# -----------------------------------------------------------------------------
# Checkpoints

def test_own_checkpoint_round_trip(tmp_path):
    """A {"model", "config", "step"} checkpoint loads with weights_only=True, config taken from the file."""
    vq = tiny_model()
    path = tmp_path / "vq.pt"
    torch.save({"model": vq.state_dict(), "config": asdict(TINY), "step": 7}, path)
    assert torch.load(path, weights_only=True)["step"] == 7, "checkpoint is not weights-only loadable"
    loaded = VQModel.from_checkpoint(str(path)).eval()
    assert loaded.config == TINY, f"config {loaded.config} != {TINY}"
    images = images_to_tensor(random_images(2, 16, 16))
    assert torch.equal(loaded.encode(images), vq.encode(images)), "loaded tokenizer encodes differently"


def test_checkpoint_mismatch_is_a_clear_error(tmp_path):
    """A renamed key or the wrong architecture raises ValueError naming the key; a missing file, FileNotFoundError."""
    state = tiny_model().state_dict()
    state["quantize.codebook"] = state.pop("quantize.embedding.weight")
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        VQModel.from_checkpoint({"model": state}, TINY)
    with pytest.raises(ValueError, match="does not match"):
        VQModel.from_checkpoint({"model": tiny_model().state_dict()}, VQ_PRESETS["VQ-16"])  # wrong shapes
    with pytest.raises(ValueError, match=r"widths \[8, 16, 16\], not all divisible by LlamaGen's 32 GroupNorm groups"):
        VQModel.from_checkpoint({"model": tiny_model().state_dict()})  # no config, and not LlamaGen's norms
    with pytest.raises(FileNotFoundError, match="not found"):
        VQModel.from_checkpoint(str(tmp_path / "absent.pt"))
    for dropped in ("quant_conv.weight", "encoder.conv_blocks.1.res.0.conv1.weight"):  # keys the inference reads
        partial = {key: value for key, value in tiny_model().state_dict().items() if key != dropped}
        with pytest.raises(ValueError, match="does not match the model; missing"):  # not a bare KeyError
            VQModel.from_checkpoint({"model": partial})
    arpg_state = {"embeddings.weight": torch.zeros(4, 8), "head.weight": torch.zeros(2, 8)}  # ARPG's keys
    with pytest.raises(ValueError, match="is an ARPG checkpoint, not a tokenizer"):
        VQModel.from_checkpoint({"model": arpg_state, "config": {"dim": 8}})
    with pytest.raises(ValueError, match=r"does not know \(attn_resolutions\)"):  # a config of another version
        VQModel.from_checkpoint({"model": state, "config": {**asdict(TINY), "attn_resolutions": [16]}})


# -----------------------------------------------------------------------------
# The interface: shapes, ranges, errors

def test_uint8_tensor_round_trip_is_exact():
    """images_to_tensor maps uint8 into [-1, 1] and tensor_to_images(images_to_tensor(u)) == u."""
    images = random_images(3, 8, 12)
    images[0, 0, 0] = 0
    images[0, 0, 1] = 255
    tensor = images_to_tensor(images)
    assert tensor.shape == (3, 3, 8, 12) and tensor.dtype == torch.float32, f"{tensor.dtype} {tuple(tensor.shape)}"
    assert tensor.min() == -1.0 and tensor.max() == 1.0, f"range {tensor.min()}..{tensor.max()}"
    assert np.array_equal(tensor_to_images(tensor), images), "uint8 -> tensor -> uint8 is not the identity"
    assert np.array_equal(images_to_tensor(torch.from_numpy(images)), tensor), "torch input differs from numpy"
    out_of_range = tensor_to_images(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2))
    assert out_of_range.min() == 0 and out_of_range.max() == 255, "tensor_to_images does not clamp"


@pytest.mark.parametrize("height,width", [(16, 16), (8, 20)])
def test_encode_decode_shapes_and_ranges(height, width):
    """Any H, W divisible by f: codes (B, H/f, W/f) int64 in [0, V); decode gives (B, 3, H, W) in [-1, 1]."""
    vq = tiny_model()
    f = vq.downsample
    codes = vq.encode(images_to_tensor(random_images(2, height, width)))
    assert codes.shape == (2, height // f, width // f) and codes.dtype == torch.int64, \
        f"codes {codes.dtype} {tuple(codes.shape)}"
    assert codes.min() >= 0 and codes.max() < TINY.codebook_size, "codes out of range"
    images = vq.decode(codes)
    assert images.shape == (2, 3, height, width), f"decoded shape {tuple(images.shape)}"
    assert images.min() >= -1 and images.max() <= 1, f"decoded range {images.min()}..{images.max()}"


def test_encode_images_in_batches_equals_one_encode():
    """encode_images (uint8 in, batches of a few images) gives the codes of one encode() of all of them."""
    vq = tiny_model()
    images = random_images(7, 16, 16)
    expected = vq.encode(images_to_tensor(images))                        # (7, 4, 4)
    codes = vq.encode_images(images, batch_size=3)
    assert codes.device.type == "cpu" and torch.equal(codes, expected), "batched codes differ from one encode"


def test_local_codes_are_encoded_once_per_distinct_patch_and_equal_one_encode():
    """With local codes, encode_images encodes each distinct patch of the data once (plus at most 7
    fillers a batch, `encode_latents`); the codes are those of one encode() of all the images
    (built-in shapes, whose flat backgrounds repeat patch for patch)."""
    torch.manual_seed(0)
    vq = VQModel(replace(TINY, local_codes=True)).eval()
    images, _ = make_builtin_dataset(12, seed=0, image_size=32)
    encoded = []
    vq.encoder.register_forward_hook(lambda module, inputs, output: encoded.append(len(inputs[0])))
    codes = vq.encode_images(images, batch_size=5)
    distinct = len(np.unique(rearrange(images, "n (h p) (w q) c -> (n h w) (p q c)", p=4, q=4), axis=0))
    assert distinct <= sum(encoded) <= distinct + 7 * len(encoded) and distinct < 12 * 8 * 8, \
        f"encoded {sum(encoded)} patches in {len(encoded)} batches, {distinct} distinct"
    expected = vq.encode(images_to_tensor(images))                        # (12, 8, 8)
    assert torch.equal(codes, expected), "codes of distinct patches differ from one encode"


def test_local_latents_and_their_gradients_equal_every_patch_encoded_on_its_own():
    """encode_latents runs each distinct patch of a batch through the encoder once and copies its
    latent; the latents and the weights' gradients are those of encoding every patch separately."""
    torch.manual_seed(0)
    vq = VQModel(replace(TINY, local_codes=True)).train()
    images = images_to_tensor(make_builtin_dataset(3, seed=0, image_size=32)[0])  # (3, 3, 32, 32)
    encoded = []
    hook = vq.encoder.register_forward_hook(lambda module, inputs, output: encoded.append(len(inputs[0])))
    latents = vq.encode_latents(images)                                   # (3, d, 8, 8)
    hook.remove()
    patches = rearrange(images, "b c (h p) (w q) -> (b h w) c p q", p=4, q=4)
    distinct = len(patches.flatten(1).unique(dim=0))
    assert distinct < len(patches) and encoded == [distinct + -distinct % 8], \
        f"the encoder saw {encoded} patches; {distinct} of {len(patches)} are distinct"
    each = rearrange(vq.quant_conv(vq.encoder(patches)), "(b h w) d 1 1 -> b d h w", b=3, h=8)
    torch.testing.assert_close(latents, each, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"the latents differ from encoding each patch separately: {m}")
    weights = torch.randn_like(each)                                      # any loss of the latents
    shared = torch.autograd.grad((latents * weights).sum(), list(vq.parameters()), allow_unused=True)
    separate = torch.autograd.grad((each * weights).sum(), list(vq.parameters()), allow_unused=True)
    for (name, _), a, b in zip(vq.named_parameters(), shared, separate):
        if b is None:                                                     # the decoder and the codebook
            assert a is None, f"{name} got a gradient from the encoder"
            continue
        atol = max(1e-5 * b.abs().max().item(), 1e-6)                     # sums in another order
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def test_bad_inputs_give_clear_errors():
    """Wrong channel count, sizes not divisible by f, uint8 tensors, out-of-range codes, misshapen
    uint8 batches for encode_images and a training run of no steps are ValueErrors."""
    vq = tiny_model()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vq.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        vq.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="float"):
        vq.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.decode(torch.full((1, 2, 2), 64))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.decode(torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        vq.decode(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"got ndarray int64 \(1, 2, 2\); torch.from_numpy\(\) converts"):
        vq.decode(np.zeros((1, 2, 2), dtype=np.int64))                    # named as what it is, not its shape
    with pytest.raises(ValueError, match=r"integer torch tensor \(B, h, w\), got Tensor torch.bool"):
        vq.decode(torch.ones(1, 2, 2, dtype=torch.bool))                  # not codes 0 and 1
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor(np.zeros((1, 8, 8, 3), dtype=np.float32))
    local = VQModel(replace(TINY, local_codes=True))                      # its patch path reshapes first
    for images, message in ((np.zeros((1, 18, 16, 3), np.uint8), "18x16 is not divisible"),
                            (np.zeros((16, 16, 3), np.uint8), r"uint8 images \(N >= 1, H, W, 3\)"),
                            (np.zeros((0, 16, 16, 3), np.uint8), r"got uint8 \(0, 16, 16, 3\)")):
        with pytest.raises(ValueError, match=message):
            local.encode_images(images)
    with pytest.raises(ValueError, match="max_steps must be at least 1"):  # it used to train forever
        train_tokenizer(random_images(2, 16, 16), TINY, "unused.pt", max_steps=0)
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16' and batch_size at least 1, got 'fp16'"):
        train_tokenizer(random_images(2, 16, 16), TINY, "unused.pt", max_steps=1, precision="fp16")  # not fp32
    with pytest.raises(ValueError, match="batch_size at least 1, got 'fp32' and 0"):
        train_tokenizer(random_images(2, 16, 16), TINY, "unused.pt", max_steps=1, batch_size=0)


@pytest.mark.parametrize("local_codes", [False, True])
def test_encoding_and_decoding_make_no_tensor_on_the_cpu(local_codes, monkeypatch):
    """As the ARPG's device test (tests/test_arpg.py): on the meta device, which like CUDA refuses
    to mix with CPU tensors, encode and decode run through; the code check reads values, so it is off."""
    monkeypatch.setattr(VQModel, "check_codes", lambda *args: None)
    with torch.device("meta"):
        vq = VQModel(replace(TINY, local_codes=local_codes)).eval()
        images = torch.zeros(2, 3, 16, 20)
    codes = vq.encode(images)
    decoded = vq.decode(codes)
    assert codes.shape == (2, 4, 5) and codes.device.type == "meta", \
        f"expected (2, 4, 5) codes on meta, got {tuple(codes.shape)} on {codes.device}"
    assert decoded.shape == (2, 3, 16, 20) and decoded.device.type == "meta", \
        f"expected (2, 3, 16, 20) images on meta, got {tuple(decoded.shape)} on {decoded.device}"


# -----------------------------------------------------------------------------
# Training pieces

def test_straight_through_gradients_reach_the_encoder():
    """The reconstruction loss alone gives the encoder a gradient, through the non-differentiable argmin."""
    vq = tiny_model().train()
    images = images_to_tensor(random_images(2, 16, 16))
    recon, codes, codebook_loss, commitment_loss = vq(images)
    torch.nn.functional.mse_loss(recon, images).backward()
    grad = vq.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0, "no gradient reached the encoder"


def test_codebook_loss_trains_the_codes_and_commitment_loss_the_encoder():
    """VQ-VAE's two losses are one squared distance with the other side frozen: equal in value, the
    codebook loss's gradient reaches only the codebook, the commitment loss's only the encoder."""
    vq = tiny_model().train()
    _, _, codebook_loss, commitment_loss = vq(images_to_tensor(random_images(2, 16, 16)))
    assert codebook_loss.item() > 0 and codebook_loss.item() == commitment_loss.item(), \
        f"codebook loss {codebook_loss.item()}, commitment loss {commitment_loss.item()}"
    codes, first_conv = vq.quantize.embedding.weight, vq.encoder.conv_in.weight
    codebook_loss.backward(retain_graph=True)
    assert codes.grad.abs().sum() > 0 and first_conv.grad is None, "the codebook loss must move the codes alone"
    vq.zero_grad(set_to_none=True)
    commitment_loss.backward()
    assert codes.grad is None and first_conv.grad.abs().sum() > 0, "the commitment loss must move the encoder alone"


@pytest.mark.parametrize("kernel, padding", [(3, 1), (1, 0), (2, 1)])
def test_conv_shortcut_on_1x1_maps_equals_the_convolution(kernel, padding):
    """tokenizer.Conv2d's linear shortcut on 1x1 maps gives the convolution's output and gradients
    (an even kernel, which grows the map, takes the convolution itself)."""
    torch.manual_seed(0)
    conv = Conv2d(16, 24, kernel, padding=padding)
    x = torch.randn(5, 16, 1, 1, requires_grad=True)
    out = conv(x)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad_out)
    x_ref = x.detach().clone().requires_grad_()
    weight_ref = conv.weight.detach().clone().requires_grad_()
    bias_ref = conv.bias.detach().clone().requires_grad_()
    out_ref = F.conv2d(x_ref, weight_ref, bias_ref, padding=padding)
    grads_ref = torch.autograd.grad(out_ref, (x_ref, weight_ref, bias_ref), grad_out)
    torch.testing.assert_close(out, out_ref, msg=lambda m: f"the output differs from F.conv2d's: {m}")
    for name, grad, grad_ref in zip(("input", "weight", "bias"), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, msg=f"{name} gradient differs")


def test_dead_codes_are_restarted_onto_latents():
    """Codes absent from the usage window move onto (normalised) batch latents; used codes stay put."""
    vq = tiny_model().train()
    quantizer = vq.quantize
    quantizer.record_usage(torch.tensor([[[3, 5]]]))  # only codes 3 and 5 were ever used
    before = quantizer.embedding.weight.detach().clone()
    latents = torch.randn(1, TINY.codebook_embed_dim, 4, 4)
    moved = quantizer.restart_dead_codes(latents)
    after = quantizer.embedding.weight.detach()
    assert moved == TINY.codebook_size - 2, f"{moved} codes restarted, expected {TINY.codebook_size - 2}"
    assert torch.equal(after[[3, 5]], before[[3, 5]]), "a used code was moved"
    candidates = quantizer.normalize(latents).permute(0, 2, 3, 1).reshape(-1, TINY.codebook_embed_dim)
    dead = [code for code in range(TINY.codebook_size) if code not in (3, 5)]
    distances = torch.cdist(after[dead], candidates, compute_mode="donot_use_mm_for_euclid_dist")  # exact, not via mm
    distance = distances.min(dim=1).values.max().item()                 # the farthest restarted code's nearest latent
    assert distance < 1e-6, f"a restarted code is {distance} away from every latent"


def test_restarted_codes_avoid_latents_that_already_have_a_code():
    """k-means++ placement: a latent sitting exactly on a live code has probability 0 of being
    drawn, so restarted codes land only on the latents no code describes yet."""
    vq = tiny_model().train()
    quantizer = vq.quantize
    covered = quantizer.codebook()[3].clone()          # latents equal to live code 3 ...
    fresh = F.normalize(torch.randn(2, TINY.codebook_embed_dim), dim=1)  # ... and two others
    latents = torch.cat([covered.expand(14, -1), fresh]).T.reshape(1, TINY.codebook_embed_dim, 4, 4)
    dead = [TINY.codebook_size - 2, TINY.codebook_size - 1]
    quantizer.record_usage(torch.arange(TINY.codebook_size - 2).view(1, 1, -1))  # the last two are dead
    assert quantizer.restart_dead_codes(latents) == 2, "the two unused codes should be restarted"
    distance = torch.cdist(quantizer.embedding.weight[dead].detach(), fresh)  # (2 codes, 2 fresh latents)
    assert distance.min(dim=1).values.max() < 1e-6, "a restarted code was put on a latent code 3 describes"
    assert distance.argmin(dim=1).unique().numel() == 2, "both restarted codes were put on the same latent"


def test_local_codes_depend_only_on_their_own_patch():
    """With local_codes, changing the pixels of one f x f patch changes no other patch's latent."""
    torch.manual_seed(0)
    vq = VQModel(replace(TINY, local_codes=True)).eval()
    images = images_to_tensor(random_images(1, 16, 16))
    edited = images.clone()
    edited[:, :, 4:8, 8:12] = -images[:, :, 4:8, 8:12]  # patch (1, 2) of the 4 x 4 grid
    with torch.no_grad():
        changed = (vq.encode_latents(images) - vq.encode_latents(edited)).abs().amax(dim=1)[0]  # (4, 4)
    assert changed[1, 2] > 1e-3, "editing a patch did not change its own latent"
    changed[1, 2] = 0
    assert changed.max() == 0, f"other patches' latents changed by up to {changed.max().item()}"
    assert vq.encode(images).shape == (1, 4, 4), "codes on the usual grid"


def test_train_tokenizer_writes_loadable_checkpoint_and_grid(tmp_path, capsys):
    """A few training steps write an atomic checkpoint (weights-only) and a reconstruction grid,
    and a last line says why the training stopped."""
    images = random_images(12, 16, 16)
    path = tmp_path / "vq.pt"
    vq = train_tokenizer(images, TINY, str(path), max_steps=3, batch_size=4, seed=0,
                         preview_path=str(tmp_path / "recon.png"))
    assert not vq.training, "train_tokenizer should return the model in eval mode"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["config"] == asdict(TINY), f"stored {checkpoint['step']}, config"
    loaded = VQModel.from_checkpoint(str(path)).eval()
    x = images_to_tensor(images[:2])
    assert torch.equal(loaded.encode(x), vq.encode(x)), "checkpoint does not hold the returned model"
    assert (tmp_path / "recon.png").is_file(), "no reconstruction grid written"
    assert sorted(os.listdir(tmp_path)) == ["recon.png", "vq.pt"], f"a temporary file was left: {os.listdir(tmp_path)}"
    assert re.fullmatch(r"tokenizer: 3 steps in \d+\.\d min, stopped by its step count; PSNR -?\d+\.\d dB on its last "
                        r"batch", capsys.readouterr().out.strip().splitlines()[-1]), "no closing line"
    metrics = evaluate_tokenizer(vq, images)
    assert set(metrics) == {"psnr", "code_usage"}, f"metrics {metrics}"
    assert np.isfinite(metrics["psnr"]) and 0 < metrics["code_usage"] <= 1, f"metrics {metrics}"
    distinct = len(vq.encode(images_to_tensor(images)).unique())
    assert metrics["code_usage"] == distinct / TINY.codebook_size, f"{metrics} for {distinct} distinct codes"


def test_a_tokenizer_run_stopped_halfway_leaves_no_checkpoint(tmp_path, monkeypatch):
    """train.py reuses out/tokenizer.pt whenever it exists, so a run stopped by Ctrl-C after 201 of
    its 300 steps (past the 200-step mark where grids are drawn) must leave no checkpoint behind."""
    class StopAt201(tokenizer.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.n == 201:
                raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "tqdm", StopAt201)
    path = tmp_path / "vq.pt"
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(random_images(8, 8, 8), TINY, str(path), max_steps=300, batch_size=1,
                        preview_path=str(tmp_path / "recon.png"))
    assert (tmp_path / "recon.png").is_file(), "the 200-step grid should have been drawn"
    assert not path.exists(), "a half-trained tokenizer was left where train.py would pick it up"


def test_train_tokenizer_stops_at_its_minutes_before_its_steps(tmp_path, capsys):
    """With both budgets, training ends at whichever comes first: here the minutes, long before
    a million steps, with the checkpoint saved at the step it reached, and says so; a budget spent
    before the first step still takes one; no images is a clear error."""
    path = tmp_path / "vq.pt"
    train_tokenizer(random_images(12, 16, 16), TINY, str(path), max_steps=10**6, minutes=0.02, batch_size=4)
    steps = torch.load(path, weights_only=True)["step"]
    assert 1 <= steps < 10**6, f"stopped after {steps} steps"
    out = capsys.readouterr().out  # the minutes it says depend on the machine's load
    assert re.search(rf"tokenizer: {steps} steps in \d+\.\d min, stopped by its 0.02-minute budget", out), out
    train_tokenizer(random_images(12, 16, 16), TINY, str(path), minutes=1e-9, batch_size=4)  # spent before step 1
    assert torch.load(path, weights_only=True)["step"] == 1, "a budget spent at once still takes one step"
    with pytest.raises(ValueError, match="no images to train the tokenizer on"):
        train_tokenizer(random_images(12, 16, 16)[:0], TINY, str(path), max_steps=5)


def test_quantizer_searches_in_fp32_under_bf16_autocast():
    """train_tokenizer(precision="bf16") runs the model under bf16 autocast, but the nearest-code
    search stays fp32: bf16 distances (3 significant digits) would pick other codes."""
    torch.manual_seed(0)
    quantizer = VQModel(TINY).quantize
    quantizer.embedding.weight.data = torch.randn(TINY.codebook_size, TINY.codebook_embed_dim)
    latents = torch.randn(8, TINY.codebook_embed_dim, 16, 16)            # 2048 latents
    z_q, codes, codebook_loss, _ = quantizer(latents)
    flat = rearrange(quantizer.normalize(latents), "b d h w -> (b h w) d").double()
    nearest = torch.cdist(flat, quantizer.codebook().double()).argmin(dim=1).view(codes.shape)  # float64 search
    assert torch.equal(codes, nearest), "the search outside autocast is not the nearest code"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q_autocast, codes_autocast, codebook_loss_autocast, _ = quantizer(latents)
        rounded = quantizer.nearest(latents)                              # searched under autocast itself
    assert not torch.equal(rounded, nearest), "bf16 distances pick the same codes here: the test cannot tell"
    assert torch.equal(codes_autocast, nearest), "the search ran in bf16 under autocast"
    assert z_q_autocast.dtype == torch.float32 and torch.equal(z_q_autocast, z_q), "lookup not in fp32"
    assert codebook_loss_autocast.item() == codebook_loss.item(), "VQ losses not in fp32"
    usage = quantizer.codebook_used.clone()
    quantizer.record_usage(torch.zeros(0, dtype=torch.long))              # an empty batch records nothing
    assert torch.equal(quantizer.codebook_used, usage), "an empty batch changed the usage window"


def test_train_tokenizer_in_bf16_follows_fp32(tmp_path):
    """A few bf16-autocast steps land near the fp32 steps' weights (bf16 rounds the activations,
    so not on them)."""
    images = random_images(16, 16, 16)
    weights = {}
    for precision in ("fp32", "bf16"):
        vq = train_tokenizer(images, TINY, str(tmp_path / f"{precision}.pt"), max_steps=4, batch_size=8,
                             precision=precision)
        weights[precision] = torch.cat([p.detach().flatten() for p in vq.parameters()])
    start = torch.cat([p.detach().flatten() for p in tiny_model().parameters()])
    moved, gap = (weights["fp32"] - start).norm(), (weights["bf16"] - weights["fp32"]).norm()
    assert 0 < gap < 0.1 * moved, f"bf16 steps ended {gap:.4f} from the fp32 ones, which moved {moved:.4f}"


def test_tokenizer_muon_takes_the_inner_kernels_and_adamw_everything_else():
    """muon_lr > 0: Muon holds exactly the 4-dim convolution kernels but the first and the last;
    AdamW the rest, with weight decay on its kernels only. muon_lr = 0: AdamW holds every weight."""
    vq = tiny_model()
    names = {id(p): name for name, p in vq.named_parameters()}
    adamw, muon = make_tokenizer_optimizers(vq, lr=1e-3, muon_lr=0.02)
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    kernels = {name for name, p in vq.named_parameters() if p.ndim == 4}
    assert in_muon == kernels - {"encoder.conv_in.weight", "decoder.conv_out.weight"}, sorted(kernels - in_muon)
    decayed, not_decayed = ({names[id(p)] for p in group["params"]} for group in adamw.param_groups)
    assert decayed == {"encoder.conv_in.weight", "decoder.conv_out.weight"}, decayed
    assert not_decayed == set(names.values()) - in_muon - decayed, "every tensor must be in exactly one group"
    assert all(vq.get_parameter(name).ndim < 4 for name in not_decayed), "a kernel escaped weight decay"
    (only,) = make_tokenizer_optimizers(vq, lr=1e-3, muon_lr=0.0)
    assert sum(len(group["params"]) for group in only.param_groups) == len(names), "AdamW alone holds every tensor"


def test_evaluate_tokenizer_psnr_is_infinite_free_and_exact(monkeypatch):
    """evaluate_tokenizer's PSNR is the mean per-image PSNR of the uint8 round trip, across batches;
    an image reconstructed exactly counts as 10 log10(255^2 / 1e-10) dB, not as infinity. The
    decoder is replaced by one that returns each image off by 1, 2 and 0 levels in every pixel:
    squared errors of 1, 4 and 0, so 20 log10(255), 20 log10(255 / 2) and 100 + 20 log10(255) dB."""
    vq = tiny_model()
    images = random_images(3, 8, 8) // 2                                  # levels 0-127: room for +2
    shifted = images_to_tensor(images + np.array([1, 2, 0], dtype=np.uint8)[:, None, None, None])
    batches = iter([shifted[:2], shifted[2:]])
    monkeypatch.setattr(vq, "decode", lambda codes: next(batches))        # batches of 2: images 0-1, then 2
    got = evaluate_tokenizer(vq, images, batch_size=2)["psnr"]
    expected = (20 * math.log10(255) + 20 * math.log10(127.5) + 100 + 20 * math.log10(255)) / 3
    assert got == pytest.approx(expected, abs=1e-9), f"psnr {got}, expected {expected}"


# -----------------------------------------------------------------------------
# Pre-tokenizing an image folder

@pytest.fixture
def image_folder(tmp_path):
    """Two classes ("b_dogs" sorts after "a_cats"), images of mixed sizes and formats."""
    rng = np.random.default_rng(0)
    for name, sizes in (("a_cats", [(40, 24), (20, 20)]), ("b_dogs", [(16, 30)])):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.{'png' if i else 'jpg'}")
    (tmp_path / "images" / "a_cats" / "notes.txt").write_text("not an image")
    ckpt = tmp_path / "vq.pt"
    torch.save({"model": tiny_model().state_dict(), "config": asdict(TINY)}, ckpt)
    return tmp_path / "images", ckpt


def test_tokenize_folder_writes_crop_and_flip_codes(image_folder, tmp_path):
    """CLI --tokenize writes {out}/{class_id}/{index}.npy, int64 (2, h*w): the centre crop, then its
    flip; hidden files (macOS's ._ resource forks) and folders named like images are not images."""
    images, ckpt = image_folder
    (images / "a_cats" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07")      # not a JPEG at all
    (images / "a_cats" / "holiday.jpg").mkdir()                           # a folder, whatever its name
    out = tmp_path / "codes"
    main(["--tokenize", str(images), "--out", str(out), "--vq-ckpt", str(ckpt), "--image-size", "16",
          "--batch-size", "2", "--num-workers", "0", "--device", "cpu"])
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.npy"))
    assert written == ["0/0.npy", "0/1.npy", "1/0.npy"], f"wrote {written}"
    assert json.loads((out / "class_names.json").read_text()) == ["a_cats", "b_dogs"], "class names not kept"
    codes = np.load(out / "0" / "0.npy")
    assert codes.dtype == np.int64 and codes.shape == (2, 16), f"codes {codes.dtype} {codes.shape}"

    # Row 0 is the centre crop, row 1 its mirror image.
    from tokenizer import centre_crop
    vq = tiny_model()
    with Image.open(images / "a_cats" / "0.jpg") as image:
        crop = np.asarray(centre_crop(image.convert("RGB"), 16))[None]
    expected = vq.encode(images_to_tensor(np.concatenate([crop, crop[:, :, ::-1]])))
    assert np.array_equal(codes, expected.flatten(1).numpy()), "codes are not those of the crop and its flip"


def test_centre_crop_is_the_middle_square_after_halving_large_images():
    """A 96 x 64 image cropped to 64 keeps columns 16..79 unchanged; a 256 x 128 one cropped to 64 is
    first box-halved (each 2 x 2 block averaged, within rounding) and then cut to its middle square."""
    from tokenizer import centre_crop
    wide = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(centre_crop(Image.fromarray(wide), 64)), wide[:, 16:80]), "not the middle"
    large = np.random.default_rng(1).integers(0, 256, (128, 256, 3), dtype=np.uint8)
    halved = large.reshape(64, 2, 128, 2, 3).mean(axis=(1, 3))        # (64, 128, 3)
    crop = np.asarray(centre_crop(Image.fromarray(large), 64)).astype(float)
    assert np.abs(crop - halved[:, 32:96]).max() <= 1, "not the box-halved middle square"


def tokenize_cli(*argv):
    """tokenizer.py's command line as the shell runs it: errors become one line and exit code 2."""
    run_script(lambda: main(list(argv)))


@pytest.mark.parametrize("problem, expected", [
    ("missing folder", "image folder not found"), ("no images", "no images in"),
    ("an empty class", "class folder(s) b_birds in"),
    ("size not divisible", "--image-size must be a positive multiple of the tokenizer's downsampling factor 4, got 18"),
    ("size zero", "--image-size must be a positive multiple of the tokenizer's downsampling factor 4, got 0"),
    ("empty batches", "the batch size must be at least 1"), ("unknown device", "--device gpu0: not a device name")])
def test_tokenize_cli_bad_input_is_one_line_and_exit_code_2(problem, expected, image_folder, tmp_path, capsys):
    """Bad input ends the CLI with exit code 2 and a one-line error on stderr saying what was wrong."""
    images, ckpt = image_folder
    (tmp_path / "empty" / "class").mkdir(parents=True)
    if problem == "an empty class":  # between two others: ids must not shift (train.py numbers code folders)
        (images / "b_birds").mkdir()
        (images / "b_birds" / "readme.txt").write_text("no pictures yet")
    source, size = {"missing folder": (tmp_path / "absent", "16"), "no images": (tmp_path / "empty", "16"),
                    "an empty class": (images, "16"),
                    "size not divisible": (images, "18"), "size zero": (images, "0"),
                    "empty batches": (images, "16"), "unknown device": (images, "16")}[problem]
    batch = "0" if problem == "empty batches" else "64"
    device = "gpu0" if problem == "unknown device" else "cpu"
    with pytest.raises(SystemExit) as stop:
        tokenize_cli("--tokenize", str(source), "--out", str(tmp_path / "codes"), "--vq-ckpt", str(ckpt),
                     "--image-size", size, "--batch-size", batch, "--num-workers", "0", "--device", device)
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message.startswith("error: "), f"exit {stop.value.code!r}: {message!r}"
    assert message.count("\n") == 1, f"error is not one line: {message!r}"
    assert expected in message, f"the error does not say {expected!r}: {message!r}"
    assert not (tmp_path / "codes").exists(), "the code folder was created despite the error"


def test_train_cli_trains_the_small_tokenizer_on_the_folders_crops(image_folder, tmp_path, monkeypatch, capsys):
    """--train: the small preset, trained on the centre crops of the folder's images (all of them when
    there are no more than TRAINING_IMAGES), written to --out with <out>_recon.png beside it; the last
    line says how to train ARPG on the folder with it, into a checkpoint beside it; --tokenize with
    it crops the size it was trained at."""
    images, _ = image_folder
    seen = []
    real_train = tokenizer.train_tokenizer

    def train(images_uint8, config, out_path, **kwargs):
        seen.append(images_uint8)
        return real_train(images_uint8, config, out_path, **kwargs)
    monkeypatch.setattr(tokenizer, "train_tokenizer", train)
    out = tmp_path / "run" / "vq.pt"
    main(["--train", str(images), "--out", str(out), "--steps", "2", "--image-size", "16", "--num-workers", "0",
          "--device", "cpu"])
    from tokenizer import centre_crop
    crops = []
    for path in ("a_cats/0.jpg", "a_cats/1.png", "b_dogs/0.jpg"):
        with Image.open(images / path) as image:
            crops.append(np.asarray(centre_crop(image.convert("RGB"), 16)))
    assert len(seen) == 1 and sorted(image.tobytes() for image in seen[0]) == sorted(c.tobytes() for c in crops), \
        "not trained on the folder's crops"
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["config"] == asdict(VQ_PRESETS["small"]) and checkpoint["step"] == 2, checkpoint["step"]
    assert (tmp_path / "run" / "vq_recon.png").is_file(), "no reconstruction grid named after the checkpoint"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"next: python train.py --data {images} --tokenizer {out} --out {tmp_path / 'run' / 'my_arpg.pt'} "
                    "--image-size 16"), last
    # It records the size it was trained at, and --tokenize crops that size by default: 16 x 16 -> 2 x 2 codes.
    assert checkpoint["image_size"] == 16, checkpoint.get("image_size")
    main(["--tokenize", str(images), "--out", str(tmp_path / "codes"), "--vq-ckpt", str(out), "--num-workers", "0",
          "--device", "cpu"])
    assert np.load(tmp_path / "codes" / "0" / "0.npy").shape == (2, 4), "not tokenized at the size it was trained at"

    monkeypatch.setattr(tokenizer, "TRAINING_IMAGES", 2)                  # a folder larger than the cap
    main(["--train", str(images), "--out", str(out), "--steps", "1", "--image-size", "16", "--num-workers", "0",
          "--device", "cpu"])
    assert len(seen[1]) == 2, f"trained on {len(seen[1])} images, not the cap's 2"


@pytest.mark.parametrize("argv, expected", [
    (["--train", "IMAGES", "--vq-ckpt", "VQ"], "--vq-ckpt goes with --tokenize"),
    (["--train", "IMAGES", "--steps", "0"], "--steps and --batch-size must be at least 1, got 0 and 16"),
    (["--train", "IMAGES", "--batch-size", "0"], "--steps and --batch-size must be at least 1, got 1200 and 0"),
    (["--train", "IMAGES", "--image-size", "60"], "multiple of the tokenizer's downsampling factor 8, got 60"),
    (["--train", "IMAGES", "--image-size", "0"], "multiple of the tokenizer's downsampling factor 8, got 0"),
    (["--tokenize", "IMAGES"], "--tokenize needs --vq-ckpt"),
    (["--tokenize", "IMAGES", "--vq-ckpt", "VQ", "--steps", "5"], "--steps and --seed go with --train"),
    (["--tokenize", "IMAGES", "--vq-ckpt", "VQ", "--seed", "5"], "--steps and --seed go with --train"),
    (["--train", "MISSING"], "image folder not found")])
def test_train_cli_bad_input_is_one_line_and_writes_nothing(argv, expected, image_folder, tmp_path, capsys):
    """Flags of the other mode, or values --train cannot use, are one 'error:' line, exit code 2, no file."""
    images, ckpt = image_folder
    argv = [{"IMAGES": str(images), "VQ": str(ckpt), "MISSING": str(tmp_path / "absent")}.get(arg, arg) for arg in argv]
    with pytest.raises(SystemExit) as stop:
        tokenize_cli(*argv, "--out", str(tmp_path / "out" / "vq.pt"), "--num-workers", "0", "--device", "cpu")
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message.count("\n") == 1 and expected in message, repr(message)
    assert not (tmp_path / "out").exists(), "a refused command wrote something"


def test_tokenize_failing_midway_leaves_no_code_folder(image_folder, tmp_path, capsys):
    """An unreadable image after some batches are written ends in one 'error:' line and leaves
    neither --out nor its hidden work folder: train.py would take a partial code folder for whole."""
    images, ckpt = image_folder
    (images / "b_dogs" / "1.png").write_bytes(b"not a png")         # read after a_cats' two images
    with pytest.raises(SystemExit) as stop:
        tokenize_cli("--tokenize", str(images), "--out", str(tmp_path / "codes"), "--vq-ckpt", str(ckpt),
                     "--image-size", "16", "--batch-size", "1", "--num-workers", "0", "--device", "cpu")
    message = capsys.readouterr().err.splitlines()[-1]                 # after the progress bar's
    assert stop.value.code == 2 and message.startswith("error: cannot read image"), message
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["images", "vq.pt"], f"a failed run left {left} behind"


def test_tokenize_refuses_an_empty_out_before_loading_the_tokenizer(image_folder, tmp_path, monkeypatch, capsys):
    """--out "" (an unset shell variable) would be the current folder: refused in one line before the
    tokenizer is even read, as are an existing --out and a batch size of 0."""
    images, ckpt = image_folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(VQModel, "from_checkpoint", lambda *args: pytest.fail("the tokenizer was loaded"))
    for out, batch, expected in (("", "64", "error: --out is empty; give a folder name for the codes"),
                                 (str(images), "64", f"error: --out {images} already exists"),
                                 ("codes", "0", "error: the batch size must be at least 1, got 0")):
        with pytest.raises(SystemExit) as stop:
            tokenize_cli("--tokenize", str(images), "--out", out, "--vq-ckpt", str(ckpt), "--batch-size", batch,
                         "--num-workers", "0", "--device", "cpu")
        message = capsys.readouterr().err
        assert stop.value.code == 2 and message.startswith(expected) and message.count("\n") == 1, repr(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "vq.pt"], \
        f"files written by a refused run: {sorted(p.name for p in tmp_path.iterdir())}"


def test_tokenize_refuses_an_existing_out_folder(image_folder, tmp_path, capsys):
    """An existing --out is refused in one line, untouched, instead of being merged into."""
    images, ckpt = image_folder
    (tmp_path / "codes" / "0").mkdir(parents=True)
    (tmp_path / "codes" / "0" / "0.npy").write_bytes(b"old codes")
    with pytest.raises(SystemExit) as stop:
        tokenize_cli("--tokenize", str(images), "--out", str(tmp_path / "codes"), "--vq-ckpt", str(ckpt),
                     "--image-size", "16", "--num-workers", "0", "--device", "cpu")
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message == f"error: --out {tmp_path / 'codes'} already exists; remove it or " \
                                               "choose another folder for the codes\n", repr(message)
    assert (tmp_path / "codes" / "0" / "0.npy").read_bytes() == b"old codes", "the old codes were touched"
