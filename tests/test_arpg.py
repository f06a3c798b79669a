"""arpg.py against the official implementation (fixtures in tests/fixtures) and its invariants."""

import argparse
import gc
import json
import math
import os
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import arpg
from arpg import (ARPG, ARPG_PRESETS, ARPGConfig, apply_rope, build_rope_table, infer_config, reveal_counts,
                  rotate, rotation_tables, sample_tokens, save_atomic)
from bench import peak_cpu_bytes

FIXTURES = Path(__file__).parent / "fixtures"
REF = np.load(FIXTURES / "arpg_tiny_reference.npz")


@pytest.fixture(scope="module")
def official():
    """The official tiny model (random weights, non-zero head) in eval mode."""
    config = ARPGConfig(**json.loads(str(REF["config"])))
    return ARPG.from_checkpoint(str(FIXTURES / "arpg_tiny_official.pt"), config).eval()


# Tests with a GPU variant run it where there is one (`.ci/gpu` runs them; CI has none).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = replace(ARPG_PRESETS["tiny"], vocab_size=64, block_size=16, dim=64, **overrides)
    model = ARPG(config).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head gives uniform, uninformative logits
    return model


def generate_settings(steps):
    settings = json.loads(str(REF[f"gen{steps}_settings"]))
    return torch.tensor(settings["classes"]), dict(
        steps=settings["steps"], cfg_scale=settings["guidance_scale"], cfg_schedule=settings["cfg_schedule"],
        schedule=settings["sample_schedule"])


def record_guided_calls(model, rope=None):
    """Wrap model.guided to record (target positions, batch rows, logits) of every call; `rope` is
    the RoPE table of the grid sampled (default: the training grid's, model.rope). The logits are
    copied, since sampling overwrites them with their probabilities."""
    calls, guided = [], model.guided
    rope = model.rope if rope is None else rope

    def recording(target_rope, shared_kv, mask=None):
        logits = guided(target_rope, shared_kv, mask)
        # Each grid position has its own RoPE row: find it to recover the target positions.
        slot = (rope[1:, None] == target_rope[0][None]).flatten(2).all(-1).float().argmax(0)  # (K,)
        calls.append((slot, shared_kv[0].shape[0], logits.clone()))
        return logits

    model.guided = recording
    return calls


# --- parity with the official implementation ---

def test_teacher_forced_logits_match_official(official):
    """Random-order teacher forcing gives the official logits and loss for the same order, to fp32 rounding.

    The fixture is float32 from one CPU; another CPU's kernels sum in another order. On an AVX-512 machine
    our float32 logits differ from it by up to 1.3e-4 (mean 7e-6, logits up to 12), and the fixture itself
    is 2.7e-4 away from our float64 logits, so 1e-3 (1e-4 of the logits' range) bounds rounding, not bugs.
    """
    logits, loss = official(torch.from_numpy(REF["tokens"]), torch.from_numpy(REF["classes"]),
                            torch.from_numpy(REF["order"]))
    diff = (logits - torch.from_numpy(REF["tf_logits"])).abs()
    assert diff.max() <= 1e-3, f"max |logit difference| {diff.max():.2e} > 1e-3"
    assert diff.mean() <= 5e-5, f"mean |logit difference| {diff.mean():.2e} > 5e-5"
    assert abs(loss.item() - REF["tf_loss"].item()) <= 1e-5, f"loss {loss.item()} vs {REF['tf_loss'].item()}"


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("steps", [8, 32])
def test_greedy_generation_matches_official(official, steps, fast):
    """With the official order, schedule and guidance, greedy decoding (top_k=1) gives the official
    tokens, on the readable path and on the fast one (the official configuration: the class token's
    zero RoPE slot, no query positions, the blocks split half and half)."""
    labels, settings = generate_settings(steps)
    tokens = official.generate(labels, **settings, top_k=1, order=torch.from_numpy(REF[f"gen{steps}_order"]), fast=fast)
    expected = torch.from_numpy(REF[f"gen{steps}_tokens"])
    assert torch.equal(tokens, expected), f"{(tokens != expected).sum().item()} of {tokens.numel()} tokens differ"


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("steps", [8, 32])
def test_sampled_generation_matches_official_random_stream(official, steps, fast):
    """Full multinomial sampling consumes random numbers as the official loop does, so its samples match.

    The official loop draws one uniform per label (an unused class-dropout check), then the order
    as argsort of uniforms, then one multinomial per step; we replay the first two here.
    """
    labels, settings = generate_settings(steps)
    torch.manual_seed(int(REF[f"gen{steps}_sampled_seed"]))
    torch.rand(len(labels))
    order = torch.rand(256).argsort()
    tokens = official.generate(labels, **settings, order=order, fast=fast)
    expected = torch.from_numpy(REF[f"gen{steps}_sampled_tokens"])
    assert torch.equal(tokens, expected), f"{(tokens != expected).sum().item()} of {tokens.numel()} tokens differ"


@pytest.mark.parametrize("schedule", ["arccos", "cosine"])
@pytest.mark.parametrize("steps", [8, 16, 32, 64])
def test_reveal_counts_match_official(schedule, steps):
    """Tokens revealed per step equal the official schedule for 256 tokens."""
    counts = reveal_counts(256, steps, schedule)
    assert counts == REF[f"schedule_{schedule}_{steps}"].tolist(), f"{schedule}/{steps}: {counts}"


def official_reveal_counts(length, steps, schedule):
    """The official sampler's loop, transcribed: numpy's float64 arithmetic in its order."""
    counts, masked = [], length
    for step in range(steps):
        if schedule == "cosine":
            ratio = np.cos(math.pi / 2. * (step + 1) / steps)
        else:
            ratio = np.arccos(1. * (step + 1) / steps) / (math.pi * 0.5)
        mask_len = length if step == steps - 1 else max(1, min(masked - 1, int(np.floor(length * ratio))))
        revealed = masked if step == steps - 1 else masked - mask_len
        counts.append(revealed)
        masked -= revealed
    return counts


def test_reveal_counts_follow_the_official_arithmetic_at_every_step_count():
    """For every step count on grids of 16, 64 and 256 tokens the counts are the official loop's
    (cosine's angle rounds differently when computed as (pi/2) * (s / S): 256 tokens in 39 steps
    then reveal 8, 10 where the official reveals 9, 9); on 1024 tokens every step reveals one at
    least and all are revealed."""
    for schedule in ("cosine", "arccos"):
        for length in (16, 64, 256):
            for steps in range(1, length + 1):
                counts = reveal_counts(length, steps, schedule)
                assert counts == official_reveal_counts(length, steps, schedule), (schedule, length, steps)
        for steps in range(1, 1025):
            counts = reveal_counts(1024, steps, schedule)
            assert sum(counts) == 1024 and min(counts) >= 1 and len(counts) == steps, (schedule, steps)


def test_reveal_counts_one_token_per_step_at_most_steps():
    """Every step reveals at least one token and all are revealed, even with as many steps as tokens;
    more steps than tokens, or none, is refused."""
    for length, steps in [(256, 256), (64, 64), (64, 63), (10, 3), (1, 1)]:
        counts = reveal_counts(length, steps, "cosine")
        assert sum(counts) == length and min(counts) >= 1 and len(counts) == steps, (length, steps, counts)
    for length, steps in [(4, 6), (5, 0)]:  # more steps than tokens, or none: no such schedule
        with pytest.raises(ValueError, match=f"steps must be between 1 and the {length} tokens to reveal, got {steps}"):
            reveal_counts(length, steps, "cosine")


@pytest.mark.parametrize("size", ["L", "XL", "XXL"])
def test_preset_state_dict_matches_official_keys_and_shapes(size):
    """Each preset has exactly the official checkpoint's keys, shapes and parameter count."""
    reference = json.loads((FIXTURES / "checkpoint_keys.json").read_text())
    with torch.device("meta"):
        model = ARPG(ARPG_PRESETS[size])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference[f"ARPG-{size}"], f"{size}: keys/shapes differ from the official checkpoint"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == reference[f"ARPG-{size} params"], f"{size}: {n_params} parameters"
    assert infer_config(model.state_dict()) == ARPG_PRESETS[size], f"{size} not recognised from its shapes"


def test_an_uneven_split_of_the_blocks_is_built_loaded_and_recognised():
    """pass1_layers sets how many blocks Pass 1 gets (tiny: 2 of 7); the state dict then holds that
    many self_dec blocks, the weights alone give the split back, and a split that leaves a pass
    empty is refused."""
    config = replace(ARPG_PRESETS["L"], dim=128, n_head=4, n_layer=5, pass1_layers=1, vocab_size=64, num_classes=10)
    model = ARPG(config)
    blocks = {name: len({k.split(".")[2] for k in model.state_dict() if k.startswith(f"layers.{name}.")})
              for name in ("self_dec", "cross_dec")}
    assert blocks == {"self_dec": 1, "cross_dec": 4}, blocks
    assert infer_config(model.state_dict()) == config, "the config read back from the weights differs"
    loaded = ARPG.from_checkpoint({"model": model.state_dict()})  # no config saved: inferred from the shapes
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values())), \
        "the loaded weights differ from the saved ones"
    for bad in (0, 5):
        with pytest.raises(ValueError, match="at least one block for each pass"):
            replace(config, pass1_layers=bad)


@pytest.mark.parametrize("overrides, message", [
    (dict(dim=100, n_head=4), "dim 100 must split into 4 heads whose size is a multiple of 4"),  # 25 per head
    (dict(dim=1030, n_head=16), "dim 1030 must split into 16 heads"),                           # 1030 / 16: no integer
    (dict(n_layer=7), r"n_layer must be even \(half Pass 1, half Pass 2\), got 7; or set pass1_layers"),
    (dict(class_rope="none"), "class_rope must be 'zero' or 'identity', got 'none'"),
    (dict(block_size=48), "block_size must be a square grid of tokens, got 48"),
])
def test_a_config_that_cannot_be_built_is_refused_naming_the_setting(overrides, message):
    """ARPGConfig refuses, when it is made, heads that 2-D RoPE cannot split, an odd block count
    without pass1_layers, an unknown class-token RoPE and a grid that is not square."""
    with pytest.raises(ValueError, match=message):
        ARPGConfig(**overrides)


@pytest.mark.parametrize("class_rope, query_position, shift_matters",
                         [("zero", False, False), ("identity", False, True), ("zero", True, True)])
def test_only_the_tiny_departures_make_a_shifted_canvas_predict_differently(class_rope, query_position, shift_matters):
    """RoPE only sees offsets between tokens. Under the official zero slot the class key is zero,
    so moving the revealed token and the query by the same offset changes nothing. Each of the tiny
    preset's departures breaks that: with the identity slot the logit against the class key depends
    on where the query is, and with query_position the query's own vector does."""
    model = small_model(class_rope=class_rope, query_position=query_position)
    model.embeddings.weight.data.normal_(std=1.0)  # larger weights so the attention logits matter
    ids = torch.tensor([[model.class_ids(torch.tensor(3)).item(), 17]])  # class token, one revealed code
    cols = model.config.grid_size                                        # 4: a 4 x 4 grid

    def logits(token_pos, query_pos):  # positions as (row, col); RoPE slot = 1 + row * cols + col
        slots = torch.tensor([0, 1 + token_pos[0] * cols + token_pos[1]])
        shared_kv = model.context(ids, model.rope[slots][None])[-1]
        return model.guided(model.rope[[1 + query_pos[0] * cols + query_pos[1]]][None], shared_kv)  # (1, 1, V)

    spread = (logits((0, 0), (1, 2)) - logits((1, 1), (2, 3))).abs().max().item()  # both: 1 down, 2 right
    assert (spread > 1e-4) == shift_matters, f"{class_rope=}, {query_position=}: shifted logits differ by {spread:.2e}"


# --- invariants of the decoding loop ---

def test_cached_decoding_equals_recomputation_without_cache():
    """Each step's logits with the KV cache equal a from-scratch pass over everything revealed so far.

    Without a cache, Pass 1 re-reads all tokens fed so far under a block mask (a token sees the
    tokens fed in its own step and before: exactly what the cached loop lets it see), then Pass 2
    queries the new targets against all keys.
    """
    model = small_model()
    calls = record_guided_calls(model)
    labels = torch.tensor([1, 5])
    tokens = model.generate(labels, steps=5, cfg_scale=1.0, temperature=0.7, generator=torch.Generator().manual_seed(0))
    feed_ids, feed_slots, feed_step = model.class_ids(labels)[:, None], [0], [0]
    for step, (targets, _, cached_logits) in enumerate(calls):
        step_of = torch.tensor(feed_step)
        block_mask = step_of[None, :] <= step_of[:, None]                # (T, T): same step or earlier
        rope = model.rope[torch.tensor(feed_slots)][None]
        shared_kv = model.context(feed_ids, rope, mask=block_mask)[-1]
        fresh_logits = ARPG.guided(model, model.rope[targets + 1][None], shared_kv)
        diff = (fresh_logits - cached_logits).abs().max().item()
        assert diff < 1e-5, f"step {step}: cached and recomputed logits differ by {diff:.2e}"
        feed_ids = torch.cat([feed_ids, tokens[:, targets]], dim=1)
        feed_slots += (targets + 1).tolist()
        feed_step += [step + 1] * len(targets)


def test_changing_a_later_token_never_changes_earlier_logits():
    """Teacher forcing is causal in the generation order: logits for order[0..k] ignore x[order[k]] onwards."""
    model = small_model()
    torch.manual_seed(1)
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([0, 3])
    order = torch.stack([torch.randperm(16), torch.randperm(16)])
    logits, _ = model(tokens, labels, order)
    k = 6
    changed = tokens.clone()
    for b in range(2):  # change the token the model must predict at index k, and everything after
        changed[b, order[b, k:]] = (changed[b, order[b, k:]] + 1) % 64
    changed_logits, _ = model(changed, labels, order)
    assert torch.equal(logits[:, :k + 1], changed_logits[:, :k + 1]), "a later token leaked into earlier logits"
    assert not torch.equal(logits[:, k + 1:], changed_logits[:, k + 1:]), "later logits should see the change"


def test_training_and_eval_forward_see_the_same_tokens():
    """The causal mask does not depend on train/eval mode: with dropout off, both give the same logits."""
    model = small_model(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)
    tokens, labels, order = torch.randint(0, 64, (2, 16)), torch.tensor([2, 4]), torch.randperm(16).repeat(2, 1)
    eval_logits, _ = model.eval()(tokens, labels, order)
    train_logits, _ = model.train()(tokens, labels, order)
    assert torch.allclose(eval_logits, train_logits, atol=1e-6), "train and eval forward differ"


def record_class_tokens(model):
    """Wrap model.context to record the first Pass-1 input of every call: the class token (B,)."""
    fed, context = [], model.context

    def recording(ids, rope, mask=None, caches=None):
        fed.append(ids[:, 0].clone())
        return context(ids, rope, mask, caches)

    model.context = recording
    return fed


def test_class_dropout_one_trains_on_the_null_class_and_eval_keeps_the_labels():
    """Label dropout (SPEC 5) with class_dropout_prob=1: a training forward gives exactly the logits
    of an eval forward fed the null class instead of the labels, and an eval forward keeps the
    labels (its logits differ from those)."""
    model = small_model(class_dropout_prob=1.0, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    tokens, labels, order = torch.randint(0, 64, (3, 16)), torch.tensor([2, 4, 7]), torch.randperm(16).repeat(3, 1)
    train_logits, _ = model.train()(tokens, labels, order)
    eval_logits, _ = model.eval()(tokens, labels, order)
    model.class_ids = lambda labels: torch.full_like(labels, model.null_class_id)  # every label read as null
    null_logits, _ = model.eval()(tokens, labels, order)
    assert torch.allclose(train_logits, null_logits, atol=1e-6), "training did not replace the labels by the null class"
    assert not torch.allclose(eval_logits, null_logits, atol=1e-3), "eval mode dropped the labels too"


def test_class_dropout_drops_about_its_fraction_of_labels_in_training_and_none_in_eval():
    """With class_dropout_prob=0.5, a training forward over 2000 labels feeds the null class for
    about half of them (within 0.06: five binomial standard deviations are 0.056) and the label's
    own class token for the rest; an eval forward feeds every label's class token."""
    model = small_model(n_layer=2, pass1_layers=1, class_dropout_prob=0.5)  # 1 + 1 blocks: a quick forward
    fed = record_class_tokens(model)
    labels = torch.arange(2000) % 10
    tokens = torch.zeros(2000, 16, dtype=torch.long)
    with torch.no_grad():
        model.train()(tokens, labels)
        model.eval()(tokens, labels)
    train_fed, eval_fed = fed
    dropped = train_fed == model.null_class_id
    assert abs(dropped.float().mean().item() - 0.5) < 0.06, f"{dropped.float().mean():.3f} of labels dropped, not ~0.5"
    assert torch.equal(train_fed[~dropped], model.class_ids(labels)[~dropped]), "a kept label fed another class token"
    eval_dropped = (eval_fed != model.class_ids(labels)).sum().item()
    assert eval_dropped == 0, f"eval mode dropped {eval_dropped} labels"


def test_token_dropout_drops_pass1_embeddings_but_never_pass2_queries():
    """Token dropout (SPEC 5: "on input embeddings, not on queries"): in a training forward the
    input of Pass 1's first block is its eval-mode input with about half the entries zeroed
    (p=0.5) and the rest doubled, while the input of Pass 2's first block (the [MASK] queries)
    is exactly the eval-mode one."""
    model = small_model(token_dropout_p=0.5, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)
    block_inputs = {}
    for name, block in (("pass1", model.layers.self_dec[0]), ("pass2", model.layers.cross_dec[0])):
        block.register_forward_pre_hook(lambda module, args, name=name: block_inputs.__setitem__(name, args[0]))
    tokens, labels, order = torch.randint(0, 64, (4, 16)), torch.tensor([1, 3, 5, 7]), torch.randperm(16).repeat(4, 1)
    model.eval()(tokens, labels, order)
    expected = dict(block_inputs)
    model.train()(tokens, labels, order)
    kept = block_inputs["pass1"] != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.05, f"{kept.float().mean():.3f} of Pass-1 inputs kept, not ~0.5"
    torch.testing.assert_close(block_inputs["pass1"][kept], 2 * expected["pass1"][kept],
                               msg="kept Pass-1 inputs are not the eval-mode ones scaled by 1 / (1 - p) = 2")
    assert torch.equal(block_inputs["pass2"], expected["pass2"]), "dropout touched the Pass-2 queries"


def test_cpu_autocast_attention_matches_fp32_attention():
    """Under bf16 autocast on a CPU, attention (bf16 matrix multiplies around an fp32 softmax)
    matches PyTorch's fused fp32 attention to bf16 precision, gradients included, with and without
    a mask."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8).bfloat16().float() for _ in range(3))
    for mask in (None, torch.ones(5, 5, dtype=torch.bool).tril()):
        results = []
        for autocast in (True, False):
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = arpg.attend(*inputs, mask, 0.0)
            out.float().square().sum().backward()
            results.append([out.float()] + [t.grad for t in inputs])
        for mixed, reference in zip(*results):
            torch.testing.assert_close(mixed, reference, atol=0.05, rtol=0.05,
                                       msg=lambda m: f"bf16 autocast attention vs fp32, mask {mask is not None}: {m}")


def test_every_position_is_decoded_exactly_once_in_the_given_order():
    """The targets of all steps, in sequence, are the given order: each position once."""
    model = small_model()
    calls = record_guided_calls(model)
    order = torch.randperm(16)
    model.generate(torch.tensor([0, 1, 2]), steps=4, cfg_scale=3.0, order=order)
    decoded = torch.cat([targets for targets, _, _ in calls])
    assert torch.equal(decoded, order), f"decoded {decoded.tolist()}, order {order.tolist()}"


def test_guidance_scale_one_does_not_double_the_batch():
    """cfg_scale == 1 runs B rows; any other scale runs 2B (conditional + unconditional)."""
    model = small_model()
    calls = record_guided_calls(model)
    model.generate(torch.tensor([0, 1, 2]), steps=2, cfg_scale=1.0)
    model.generate(torch.tensor([0, 1, 2]), steps=2, cfg_scale=2.0)
    assert [rows for _, rows, _ in calls] == [3, 3, 6, 6], f"rows per call: {[rows for _, rows, _ in calls]}"


def test_known_tokens_come_back_unchanged_and_only_the_rest_is_decoded():
    """Inpainting: known tokens are kept, and exactly the unknown positions are decoded, in order."""
    model = small_model()
    calls = record_guided_calls(model)
    known_tokens = torch.randint(0, 64, (2, 16))
    known_mask = torch.zeros(2, 16, dtype=torch.bool)
    known_mask[:, [0, 1, 4, 5, 10]] = True
    order = torch.randperm(16)
    tokens = model.generate(torch.tensor([3, 3]), steps=3, order=order, known_tokens=known_tokens, known_mask=known_mask)
    assert torch.equal(tokens[known_mask], known_tokens[known_mask]), "known tokens changed"
    decoded = torch.cat([targets for targets, _, _ in calls])
    assert torch.equal(decoded, order[~known_mask[0][order]]), "decoded positions are not the unknown ones in order"


def test_editing_one_token_per_step_is_greedy_teacher_forcing():
    """The prefill of known tokens is causal, as in training: decoding the unknown tokens one per step,
    greedily, gives exactly the tokens that teacher forcing (`forward`) predicts greedily, one after the
    other, in the order known tokens (in `order`'s sequence) then unknown ones."""
    model = small_model()
    known_mask = torch.zeros(2, 16, dtype=torch.bool)
    known_mask[:, [0, 2, 5, 6, 7, 11, 12, 15]] = True
    known_tokens = torch.randint(0, 64, (2, 16))
    labels, order = torch.tensor([3, 7]), torch.randperm(16)
    tokens = model.generate(labels, steps=8, cfg_scale=1.0, top_k=1, order=order,
                            known_tokens=known_tokens, known_mask=known_mask)

    full_order = torch.cat([order[known_mask[0][order]], order[~known_mask[0][order]]])  # (16,)
    expected = known_tokens.clone()
    for i in range(8, 16):                                                # each unknown position in turn
        logits, _ = model(expected, labels, order=full_order.expand(2, -1))  # (2, 16, V), causal in full_order
        expected[:, full_order[i]] = logits[:, i].argmax(-1)
    assert torch.equal(tokens, expected), f"{(tokens != expected).sum().item()} tokens differ from teacher forcing"


def test_rope_table_of_a_rectangular_grid_follows_the_formula():
    """The official fixtures only hold a square grid. For a 3 x 5 grid, row 1 + r*5 + c of the table
    is (cos, sin) of r * f_i on the first D/4 pairs and c * f_i on the rest, f_i = 1 / 10000^(2i / (D/2))
    (SPEC 4), recomputed here in plain Python, and ARPG.rope_table(3, 5) is that table: a row/column
    mix-up would pass every square test."""
    D, rows, cols = 16, 3, 5
    table = build_rope_table(rows, cols, D)
    freqs = [1 / 10000 ** (2 * i / (D // 2)) for i in range(D // 4)]
    for r in range(rows):
        for c in range(cols):
            angles = [r * f for f in freqs] + [c * f for f in freqs]
            expected = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
            torch.testing.assert_close(table[1 + r * cols + c], expected, msg=f"grid position ({r}, {c})")
    model = small_model()                                                 # and the model asks for that table
    head_dim = model.config.dim // model.config.n_head
    assert torch.equal(model.rope_table(rows, cols), build_rope_table(rows, cols, head_dim, model.config.rope_base,
                                                                      model.config.class_rope)), "ARPG.rope_table"


# Kept tokens worked out by hand for these logits: sorted, they are 0 (2.0), 7 (1.6), 1 (1.5), 2 (1.2),
# 6 (0.9), 3 (0.3), 4 (-0.5), 5 (-1.0). top-p keeps a token while the mass before it is below p.
SAMPLING_LOGITS = [2.0, 1.5, 1.2, 0.3, -0.5, -1.0, 0.9, 1.6]
SAMPLING_CASES = [
    (1.0, 0, 1.0, {0, 1, 2, 3, 4, 5, 6, 7}),  # no filter
    (0.7, 3, 1.0, {0, 7, 1}),                 # the three largest logits
    (1.0, 0, 0.45, {0, 7}),                   # probabilities .296, .199, .180: mass before token 1 is .495
    (1.0, 4, 0.8, {0, 7, 1}),                 # top-4 first, renormalised .367, .246, .222, .165: .835 before 2
    (3.0, 0, 0.9, {0, 7, 1, 2, 6, 3, 4}),     # flattened by T: .856 before token 4, .934 before token 5
]


@pytest.mark.parametrize("temperature, top_k, top_p, kept", SAMPLING_CASES)
def test_sampling_draws_the_kept_tokens_in_proportion_to_exp_logit_over_t(temperature, top_k, top_p, kept):
    """sample_tokens draws exactly the tokens the rules keep (worked out by hand above), each with
    probability exp(logit / T) over the kept tokens' sum (20,000 draws, within 0.015)."""
    draws = 20000
    tokens = sample_tokens(torch.tensor(SAMPLING_LOGITS).repeat(draws, 1), temperature, top_k, top_p,
                           torch.Generator().manual_seed(0))
    frequency = torch.bincount(tokens, minlength=len(SAMPLING_LOGITS)).double() / draws
    assert set(frequency.nonzero().flatten().tolist()) == kept, f"drew {frequency.nonzero().flatten().tolist()}"
    weight = {i: math.exp(SAMPLING_LOGITS[i] / temperature) for i in kept}
    for i in kept:
        expected = weight[i] / sum(weight.values())
        assert abs(frequency[i] - expected) < 0.015, f"token {i}: {frequency[i]:.3f} drawn, {expected:.3f} expected"


def test_a_bf16_model_keeps_an_fp32_rope_table_and_decodes_other_grids():
    """model.to(bfloat16) leaves the RoPE table fp32 and exact (rounded, its angles were off by up
    to 2e-3), and both samplers decode a grid other than the training one in bf16 (the fast path
    used to multiply the fp32 table of a new grid by bf16 weights and fail)."""
    model = small_model().to(torch.bfloat16)
    head_dim = model.config.dim // model.config.n_head
    expected = build_rope_table(4, 4, head_dim, model.config.rope_base, model.config.class_rope)
    assert model.rope.dtype == torch.float32 and torch.equal(model.rope, expected), "the table was rounded"
    for fast in (False, True):
        tokens = model.generate(torch.tensor([1, 2]), steps=4, grid=(5, 6), fast=fast)
        assert tokens.shape == (2, 30) and 0 <= tokens.min() and tokens.max() < 64, f"fast={fast}: {tokens}"


def test_larger_rectangular_grid_decodes_every_token():
    """Outpainting canvas: on a model trained on 4 x 4, a 4 x 8 grid with its centre known decodes
    each of the 16 unknown positions exactly once (recognised by their rows of the 4 x 8 RoPE table;
    an undecoded position would keep the canvas's 0, itself a valid code) and keeps the centre."""
    model = small_model()
    known_tokens, known_mask = torch.zeros(1, 32, dtype=torch.long), torch.zeros(1, 32, dtype=torch.bool)
    known_mask.view(4, 8)[:, 2:6] = True
    known_tokens.view(4, 8)[:, 2:6] = 7
    calls = record_guided_calls(model, model.rope_table(4, 8))
    tokens = model.generate(torch.tensor([1]), steps=4, grid=(4, 8), known_tokens=known_tokens, known_mask=known_mask)
    decoded = sorted(torch.cat([slot for slot, _, _ in calls]).tolist())
    assert decoded == (~known_mask[0]).nonzero().flatten().tolist(), f"decoded positions {decoded}"
    assert tokens.shape == (1, 32), tokens.shape
    assert (tokens.view(4, 8)[:, 2:6] == 7).all(), "known centre changed"
    assert tokens.min() >= 0 and tokens.max() < 64, "codes outside the vocabulary"


def test_generate_refuses_a_generator_on_another_device(meta_arpg):
    """A CPU generator for a model on another device (here the meta device, which stands in for
    CUDA) is refused at once, not when torch.multinomial meets it after the first step."""
    model, _, labels = meta_arpg
    with pytest.raises(ValueError, match=r"the generator is on cpu, the model on meta: make it with "
                                         r"torch.Generator\('meta'\)"):
        model.generate(labels, steps=4, generator=torch.Generator().manual_seed(0))


def test_same_generator_seed_gives_same_tokens():
    """Sampling is reproducible for a seeded generator."""
    model = small_model()
    a = model.generate(torch.tensor([1, 2]), steps=4, generator=torch.Generator().manual_seed(3))
    b = model.generate(torch.tensor([1, 2]), steps=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b), "same seed, different tokens"


# --- bad input and checkpoints ---

@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate(torch.tensor([10]), steps=4), "class ids must be in"),
    (lambda m: m.generate(torch.tensor([-1]), steps=4), "class ids must be in"),
    (lambda m: m.generate(torch.tensor([1]), steps=0), "steps must be between 1 and the 16 tokens to decode, got 0"),
    (lambda m: m.generate(torch.tensor([1]), steps=17), "steps must be between 1 and the 16 tokens to decode, got 17"),
    (lambda m: m.generate(torch.tensor([1]), steps=12, known_tokens=torch.zeros(1, 16, dtype=torch.long),
                          known_mask=torch.arange(16)[None] < 5), "between 1 and the 11 tokens to decode, got 12"),
    (lambda m: m.generate(torch.tensor([1]), order=torch.zeros(16, dtype=torch.long)), "order must be a permutation"),
    (lambda m: m.generate(torch.tensor([1]), schedule="linear"), "schedule must be"),
    (lambda m: m.generate(torch.tensor([1]), known_tokens=torch.zeros(1, 9, dtype=torch.long),
                          known_mask=torch.ones(1, 9, dtype=torch.bool)), "known_tokens must have shape"),
    (lambda m: m.generate(torch.tensor([1, 2, 3]), known_tokens=torch.zeros(2, 16, dtype=torch.long),
                          known_mask=torch.ones(3, 16, dtype=torch.bool)), r"known_tokens must have shape \(3, 16\)"),
    (lambda m: m.generate(torch.tensor([1]), known_tokens=torch.zeros(1, 16, dtype=torch.long),
                          known_mask=torch.ones(16, dtype=torch.bool)), "known_mask must have shape"),
    (lambda m: m.generate(torch.tensor([1]), steps=4, compile=True), "pass fast=True too"),
    (lambda m: m.generate(torch.tensor([1]), steps=4, known_tokens=torch.zeros(1, 16, dtype=torch.long)),
     "known_tokens and known_mask go together: give both or neither"),
    (lambda m: m.generate(torch.tensor([1]), steps=4, known_mask=torch.ones(1, 16, dtype=torch.bool)),
     "known_tokens and known_mask go together: give both or neither"),
    (lambda m: m.generate(torch.tensor([1, 2]), steps=4, known_tokens=torch.zeros(2, 16, dtype=torch.long),
                          known_mask=torch.tensor([[True] * 4 + [False] * 12, [False] * 16])),
     "known_mask must be the same for every row"),
    (lambda m: m(torch.zeros(2, 15, dtype=torch.long), torch.tensor([0, 1])), "tokens must have shape"),
    (lambda m: m(torch.full((2, 16), 64), torch.tensor([0, 1])), "tokens must be codes in"),
    (lambda m: m(torch.zeros(2, 16, dtype=torch.long), torch.tensor([0])), "labels must have shape"),
    (lambda m: m(torch.zeros(1, 16, dtype=torch.long), torch.tensor([0]), torch.arange(16).flip(0)[None] % 8),
     "order must be a permutation"),
    # Wrong dtypes: a float order passes a permutation check (2.0 == 2) and then fails as an index.
    (lambda m: m.generate(torch.tensor([1]), steps=4, order=torch.randperm(16).float()), "order must be a torch.long"),
    (lambda m: m(torch.zeros(1, 16, dtype=torch.long), torch.tensor([0]), torch.randperm(16, dtype=torch.int32)[None]),
     "order must be a torch.long"),
    (lambda m: m.generate(torch.tensor([1.0]), steps=4), r"labels must be integers \(torch.long\), got torch.float32"),
    (lambda m: m(torch.zeros(1, 16), torch.tensor([0])), "tokens must be integers"),
    # Other integer types: a uint8 label plus the class offset would wrap round to an image code.
    (lambda m: m.generate(torch.tensor([1], dtype=torch.uint8), steps=4),
     r"labels must be integers \(torch.long\), got torch.uint8"),
    (lambda m: m(torch.zeros(1, 16, dtype=torch.int32), torch.tensor([0])), "tokens must be integers"),
    (lambda m: m.generate(torch.tensor([1]), steps=4, known_tokens=torch.full((1, 16), 2.7),
                          known_mask=torch.ones(1, 16, dtype=torch.bool)), "known_tokens must be integers"),
    (lambda m: ARPG.from_checkpoint(m.state_dict()),  # no config given or saved, and width 64 is no preset's
     r"cannot infer the head count of a model of width 64 \(the presets' widths are 128, 1024, 1280, 1536\)"),
])
def test_bad_input_raises_a_clear_error(call, message):
    """Out-of-range classes, steps, non-permutation orders, wrong shapes and dtypes, known tokens
    without a mask (or the reverse), compile without the fast path and a checkpoint of a width no
    preset has (with no config) raise ValueError saying so."""
    with pytest.raises(ValueError, match=message):
        call(small_model())


def test_generate_s_default_steps_fit_a_canvas_of_fewer_than_32_tokens():
    """With no steps given, generate takes 32, or one per token when fewer are to be decoded (as
    the samplers' default_steps): the same tokens as steps=16 on a 16-token canvas, and as steps=4
    when 12 of its tokens are known."""
    model, labels = small_model(), torch.tensor([1, 2])
    for steps, known in ((16, 0), (4, 12)):
        known_mask = (torch.arange(16) < known).repeat(2, 1)
        edit = dict(known_tokens=torch.zeros(2, 16, dtype=torch.long), known_mask=known_mask) if known else {}
        default = model.generate(labels, generator=torch.Generator().manual_seed(0), **edit)
        explicit = model.generate(labels, steps=steps, generator=torch.Generator().manual_seed(0), **edit)
        assert torch.equal(default, explicit), f"{known} known tokens: the default is not {steps} steps"


def test_known_tokens_are_checked_only_where_the_mask_gives_them():
    """known_tokens may hold anything at unknown positions (they are decoded, never read): the edit
    runs and returns codes there; a code out of range at a known position is refused naming the range."""
    model = small_model()
    known_mask = (torch.arange(16) < 4).repeat(2, 1)                      # the first 4 positions are given
    known_tokens = torch.full((2, 16), -1)
    known_tokens[1, 4:] = 10 ** 6
    known_tokens[:, :4] = torch.tensor([5, 63, 0, 7])
    tokens = model.generate(torch.tensor([1, 2]), steps=4, known_tokens=known_tokens, known_mask=known_mask)
    assert torch.equal(tokens[:, :4], known_tokens[:, :4]), "known tokens changed"
    assert tokens.min() >= 0 and tokens.max() < 64, f"codes outside the vocabulary: {tokens.tolist()}"
    known_tokens[0, 1] = 64
    with pytest.raises(ValueError, match=r"known_tokens must be codes in \[0, 64\), got values in \[0, 64\]"):
        model.generate(torch.tensor([1, 2]), steps=4, known_tokens=known_tokens, known_mask=known_mask)


def test_checkpoint_round_trip_and_official_layouts(tmp_path):
    """Our checkpoint and the official layouts ('state_dict', 'model', 'module', bare) all load the same
    weights; ours is written whole (no temporary file left) and readable by all (mode 0644)."""
    model = small_model()
    state = model.state_dict()
    for checkpoint in ({"state_dict": state}, {"model": state}, {"module": state}, dict(state)):
        loaded = ARPG.from_checkpoint(checkpoint, model.config)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items()), list(checkpoint)[:1]
    path = tmp_path / "ours.pt"
    save_atomic({"model": state, "config": vars(model.config).copy()}, path)
    assert ARPG.from_checkpoint(str(path)).config == model.config, "saved config not used"
    assert os.listdir(tmp_path) == ["ours.pt"], f"temporary files left: {os.listdir(tmp_path)}"
    assert os.stat(path).st_mode & 0o777 == 0o644, f"checkpoint mode {oct(os.stat(path).st_mode & 0o777)}"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_ddp_and_compile_prefixes_are_stripped_when_loading(prefix):
    """A state dict saved from a DistributedDataParallel model ('module.'), a torch.compile'd one
    ('_orig_mod.'), or either wrapped in the other, loads, bare or under 'model', with the same weights."""
    model = small_model()
    state = model.state_dict()
    prefixed = {prefix + k: v for k, v in state.items()}
    for checkpoint in (prefixed, {"model": prefixed}):
        loaded = ARPG.from_checkpoint(checkpoint, model.config)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items()), f"{prefix}: weights differ"


def test_checkpoint_mismatch_names_the_keys():
    """Missing, unexpected and misshapen keys are named in the error, never skipped."""
    model = small_model()
    state = model.state_dict()
    state["layers.to_q.weight"] = state.pop("layers.to_k.weight")
    state["head.weight"] = state["head.weight"][:10]
    with pytest.raises(ValueError, match=r"missing: layers.to_k.weight.*unexpected: layers.to_q.weight.*wrong shape: head"):
        ARPG.from_checkpoint(state, model.config)


def test_a_config_from_another_version_is_named_not_a_type_error():
    """A saved config with a setting this arpg.py does not have is refused naming the setting."""
    model = small_model()
    config = {**vars(model.config), "qk_norm": True}
    with pytest.raises(ValueError, match=r"does not know \(qk_norm\): it was written by another version"):
        ARPG.from_checkpoint({"model": model.state_dict(), "config": config})


class RunsCodeWhenUnpickled:
    """Unpickling calls os.system(command): what a malicious checkpoint does."""
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_loads_its_argparse_arguments_but_no_other_pickled_object(tmp_path):
    """The official training script's checkpoints ("model" beside a pickled argparse "args") load;
    a pickled object of any other class is refused in one line, and its code never runs."""
    model = small_model()
    path = tmp_path / "official_training.pt"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4, gpt_model="ARPG-L")}, path)
    loaded = ARPG.from_checkpoint(str(path), config=model.config)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values())), \
        "the weights loaded from the official training checkpoint differ from the saved model's"

    witness = tmp_path / "the_code_ran"
    torch.save({"model": model.state_dict(), "hook": RunsCodeWhenUnpickled(f"touch {witness}")}, path)
    with pytest.raises(ValueError, match="it holds a pickled posix.system, and checkpoints are read weights-only, "
                                         "never running pickled code; re-save it as a dict of tensors"):
        ARPG.from_checkpoint(str(path), config=model.config)
    assert not witness.exists(), "loading a checkpoint ran its pickled code"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="holds a list, not a checkpoint's dict of weights"):
        ARPG.from_checkpoint(str(path))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is it a PyTorch checkpoint"):
        ARPG.from_checkpoint(str(tmp_path / "notes.pt"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ARPG.from_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cfg_scale, known", [(1.0, False), (3.0, False), (3.0, True)])
def test_fast_path_gives_the_readable_path_tokens(cfg_scale, known, fused, device, monkeypatch):
    """generate(fast=True) (preallocated caches, projections fused or kept apart, as the CPU and a
    GPU have them by default: both are tried on each device) samples exactly the readable tokens in
    fp32, on the CPU and, where there is one, on a CUDA GPU (labels and known tokens are given on
    the CPU there: generate moves them)."""
    monkeypatch.setattr(arpg, "FUSED_WEIGHTS_ON", (device,) if fused else ())
    model = small_model().to(device)
    known_tokens = torch.randint(0, 64, (4, 16))
    known_mask = (torch.arange(16) % 3 == 0).repeat(4, 1) if known else None
    kwargs = dict(steps=5, cfg_scale=cfg_scale, known_tokens=known_tokens if known else None, known_mask=known_mask)
    for seed in range(3):
        readable, fast = [model.generate(torch.tensor([0, 3, 5, 9]), fast=path, **kwargs,
                                         generator=torch.Generator(device).manual_seed(seed)) for path in (False, True)]
        assert readable.device.type == device and torch.equal(readable, fast), \
            f"seed {seed}: {(readable != fast).sum().item()} tokens differ"


def test_fast_path_rotation_is_apply_rope_bit_for_bit():
    """The fast path's RoPE (x * cos + swapped x * signed sin) gives apply_rope's exact floats."""
    rope = build_rope_table(5, 7, 32, class_rope="identity")[torch.randperm(36)][None]  # (1, 36, 16, 2)
    x = torch.randn(3, 36, 4, 32)
    cos, sin = rotation_tables(rope[:, :, None])
    assert torch.equal(rotate(x, cos, sin), apply_rope(x, rope)), "the table form of RoPE differs from apply_rope"


def test_fast_path_logits_match_the_readable_path_on_a_larger_grid():
    """Every Pass-2 call of the fast path gives the readable logits (<= 1e-5), also on a 4 x 6 canvas
    (copied as sample_tokens receives them, since it overwrites them with their probabilities)."""
    model = small_model()
    runs = []
    for fast in (False, True):
        calls = []
        real_sample = arpg.sample_tokens
        arpg.sample_tokens = lambda logits, *args, **kwargs: calls.append(logits.clone()) or real_sample(logits, *args, **kwargs)
        try:
            model.generate(torch.tensor([1, 2]), steps=6, cfg_scale=2.0, grid=(4, 6),
                           generator=torch.Generator().manual_seed(0), fast=fast)
        finally:
            arpg.sample_tokens = real_sample
        runs.append(calls)
    assert len(runs[0]) == len(runs[1]) == 6, [len(run) for run in runs]
    for step, (readable, fast) in enumerate(zip(*runs)):
        torch.testing.assert_close(fast, readable, atol=1e-5, rtol=0, msg=f"step {step}")


def test_the_fast_path_frees_its_caches_when_generate_returns(monkeypatch):
    """No reference cycle keeps a fast call's caches and fused weights alive after it: with the
    cycle collector off, each call's StaticCachePasses is gone as soon as generate returns."""
    instances = []
    real_init = arpg.StaticCachePasses.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        instances.append(weakref.ref(self))
    monkeypatch.setattr(arpg.StaticCachePasses, "__init__", init)
    model = small_model()
    gc.disable()
    try:
        for _ in range(3):
            model.generate(torch.tensor([1, 2]), steps=4, fast=True)
        assert len(instances) == 3 and all(ref() is None for ref in instances), "a fast call's caches outlived it"
    finally:
        gc.enable()


def test_the_fast_path_caches_hold_every_token_pass_1_reads_and_no_more(monkeypatch):
    """The last step's tokens are sampled and never fed back, so the preallocated caches hold the
    class token, any known tokens and every other step's tokens: each slot is written once, and
    none is left over (at ARPG-L's size a 40-token last step is 0.27 GB of caches)."""
    instances = []
    real_init = arpg.StaticCachePasses.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        instances.append(self)
    monkeypatch.setattr(arpg.StaticCachePasses, "__init__", init)
    model = small_model()
    known_mask = (torch.arange(16) % 3 == 0).repeat(2, 1)
    for kwargs in (dict(steps=5), dict(steps=3, schedule="cosine"), dict(steps=16), dict(steps=4, grid=(4, 6)),
                   dict(steps=4, known_tokens=torch.randint(0, 64, (2, 16)), known_mask=known_mask)):
        model.generate(torch.tensor([1, 2]), fast=True, **kwargs)
        passes = instances.pop()
        tokens = math.prod(kwargs.get("grid", (4, 4)))
        known = int(kwargs["known_mask"][0].sum()) if "known_mask" in kwargs else 0
        fed = 1 + tokens - reveal_counts(tokens - known, kwargs["steps"], kwargs.get("schedule", "arccos"))[-1]
        assert [buffer.shape[3] for buffer in passes.buffers] == [fed] * 3 and passes.filled == fed, (kwargs, fed)


def peak_bytes(fn, device="cpu"):
    """The most bytes of tensors that fn's own operations held at once: on the CPU from
    torch.profiler's allocation events (bench.py's measure), on a GPU from CUDA's own count."""
    if device == "cpu":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
            fn()
        return peak_cpu_bytes(profile)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fast", [False, True])
def test_guidance_and_sampling_hold_the_doubled_logits_and_half_as_much_at_most(fast, dtype, device):
    """With a vocabulary large enough that a step's logits outweigh everything else, a decoding
    call's peak is at most 1.5x the doubled (2B, K, V) fp32 logits of its largest step, and is
    exactly that on the CPU. In float32: the doubled logits beside the guided half. In bf16: the
    doubled logits in bf16 (the readable path also widens them all to float32) beside the guided
    half, and on the CPU a float32 copy of each bf16 half, which its elementwise kernels make to
    read it; a GPU's widen it as they read it, so there the fast path holds 1.0x. Sampling then
    holds the guided half and torch.multinomial's scratch, and a step's logits are freed before
    the next step's passes. Before session 21 the doubled logits stayed alive through sampling,
    beside the guided logits, a copy divided by the temperature, the probabilities and the
    scratch (3x), and a step's logits lived on through the next step's (bf16: 1.8x)."""
    torch.manual_seed(0)
    model = ARPG(replace(ARPG_PRESETS["tiny"], vocab_size=8192, block_size=16, dim=32)).eval().to(device, dtype)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    doubled = 2 * 8 * max(reveal_counts(16, 2, "arccos")) * 8192 * 4          # (2B, K, V) fp32 bytes: 5.2 MB

    def decode():
        model.generate(torch.arange(8), steps=2, cfg_scale=3.0, fast=fast)

    decode()                                                              # (a GPU's libraries set up)
    peak = peak_bytes(decode, device)
    low = 1.0 if device == "cuda" and fast and dtype == torch.bfloat16 else 1.5
    assert low * doubled <= peak < (low + 0.25) * doubled, \
        f"peak {peak / 1e6:.2f} MB, doubled logits {doubled / 1e6:.2f} MB"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.0, 50)])
def test_sampling_overwrites_its_logits_and_holds_only_multinomials_scratch(temperature, top_k, device):
    """sample_tokens turns float32 logits into their probabilities in place, filters included,
    with the tokens of the out-of-place formula (the official one), so the most it holds at once
    is torch.multinomial's scratch (its exponential noise, one tensor of the logits' size).
    Before, it also held the probabilities and, at a temperature other than 1 or with top-k, a
    filtered copy."""
    logits = torch.randn(64, 8192, device=device) * 3
    size = logits.numel() * logits.element_size()
    reference = logits / temperature
    if top_k:
        reference = reference.masked_fill(reference < reference.topk(top_k).values[:, -1:], float("-inf"))
    expected = torch.multinomial(reference.softmax(-1), 1, generator=torch.Generator(device).manual_seed(0))[:, 0]
    tokens = []
    peak = peak_bytes(lambda: tokens.append(sample_tokens(logits, temperature, top_k,
                                                          generator=torch.Generator(device).manual_seed(0))), device)
    assert torch.equal(tokens[0], expected), "not the tokens of the out-of-place formula"
    assert size <= peak < 1.1 * size, f"peak {peak / 1e6:.2f} MB, logits {size / 1e6:.2f} MB"
    assert torch.equal(logits, reference.softmax(-1)), "the logits were not overwritten by their probabilities"


def test_the_fast_path_leaves_bf16_logits_for_guidance_to_widen():
    """In bf16 the fast path's Pass 2 returns the head's bf16 logits, not a float32 copy of them
    (0.34 GB at ARPG-L's largest step): guide widens them as it reads them. The readable Pass 2
    returns float32 logits in every dtype (training's loss and the ONNX graphs)."""
    model = small_model().to(torch.bfloat16)
    passes = arpg.StaticCachePasses(model, batch=2, capacity=5)
    rope = passes.rope_rows(model.rope_table(4, 4))
    caches = passes.context(torch.tensor([[3], [4]]), rope[[0]][None])
    fast = passes.guided(rope[[2, 5]][None], caches[-1])
    readable = model.guided(model.rope_table(4, 4)[[2, 5]][None], caches[-1])
    assert fast.dtype == torch.bfloat16 and readable.dtype == torch.float32, (fast.dtype, readable.dtype)
    torch.testing.assert_close(fast.float(), readable, atol=0.05, rtol=0,
                               msg=lambda m: f"the fast path's bf16 logits differ from the readable fp32 ones: {m}")


def test_guidance_is_the_official_formula_to_the_last_bit():
    """guide(logits, g) = uncond + (cond - uncond) * g in float32, as the official loop writes it
    after widening the head's logits: the same bits from float32 logits and from bf16 ones (the
    fast path's head), which guide widens as it reads them."""
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(6, 5, 300).to(dtype)
        cond, uncond = logits.float()[:3], logits.float()[3:]
        for scale in (1.0, 2.5, 4.0, 0.3):
            guided = arpg.guide(logits, scale)
            assert guided.dtype == torch.float32 and torch.equal(guided, uncond + (cond - uncond) * scale), (dtype, scale)


@pytest.mark.parametrize("fused", [True, False])
def test_compiled_fast_path_traces_its_steps_once_for_every_batch_size(fused, monkeypatch):
    """generate(fast=True, compile=True) samples the readable tokens, and once its steps are traced
    a new batch size or step count reuses the graphs, with the projections fused (as on a CPU) or
    kept apart (as on a GPU, where the compiled path is meant to run). The first call has 2 x 32 =
    64 rows with guidance, the model's width: the case where dynamo once tied the batch to the
    weights' shapes and traced everything again for each new batch. Compiled with a backend that only counts
    graphs (tracing is what is tested; kernels are inductor's business). The first call's steps
    reveal 1 token and several, so every size the later calls meet has been seen (dynamo traces
    sizes 0 and 1 apart from the rest)."""
    traced = []

    def counting_backend(graph, example_inputs):
        traced.append(graph)
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=counting_backend, **kwargs))
    monkeypatch.setattr(arpg, "FUSED_WEIGHTS_ON", ("cpu",) if fused else ())
    torch._dynamo.reset()
    model = small_model(n_layer=3)                                        # 2 + 1 blocks: quicker to trace
    try:
        for batch, steps in [(32, 7), (16, 5), (3, 7), (48, 4)]:  # 7 steps: some reveal 1 token, some more
            labels = torch.arange(batch) % 10
            tokens = [model.generate(labels, steps=steps, cfg_scale=3.0, fast=fast, compile=fast,
                                     generator=torch.Generator().manual_seed(batch)) for fast in (False, True)]
            assert torch.equal(*tokens), f"batch {batch}: the compiled steps sampled other tokens than readable ones"
            if batch == 32:
                first_call = len(traced)
                assert first_call >= 2, f"{first_call} graphs traced: both step functions should reach the compiler"
        assert len(traced) == first_call, f"{first_call} graphs traced in the first call, {len(traced)} after the rest"
    finally:
        torch._dynamo.reset()


def test_the_compiled_training_forward_is_one_graph():
    """Under torch.compile the input checks look at shapes only, so the training step is traced
    whole (their min / max / sort split it into 7 graphs); run eagerly they still refuse bad values."""
    model = small_model().train()
    tokens, labels = torch.randint(0, 64, (3, 16)), torch.tensor([0, 1, 2])
    explained = torch._dynamo.explain(model)(tokens, labels)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with pytest.raises(ValueError, match="tokens must be codes in"):
        model(tokens + 64, labels)


def test_generate_in_training_mode_samples_without_dropout_and_restores_the_mode():
    """generate() ignores dropout even on a model in training mode, and leaves the mode as it was."""
    model = small_model(token_dropout_p=0.5, resid_dropout_p=0.5, ffn_dropout_p=0.5)
    expected = model.eval().generate(torch.tensor([1, 2]), steps=4, generator=torch.Generator().manual_seed(0))
    tokens = model.train().generate(torch.tensor([1, 2]), steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, expected), "dropout changed the samples"
    assert model.training, "generate() did not restore training mode"


def test_a_gpu_index_beyond_the_machine_s_gpus_is_refused_in_one_line(monkeypatch):
    """--device cuda:1 on a one-GPU machine (CUDA faked: it counts GPUs only) is one line naming the
    GPUs there are, not CUDA's "invalid device ordinal" traceback at the first tensor moved."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    arpg.check_device("cuda:0")
    arpg.check_device("cuda")
    with pytest.raises(ValueError, match="--device cuda:1: no such GPU; this machine has 1, numbered from cuda:0"):
        arpg.check_device("cuda:1")


def test_a_device_this_pytorch_cannot_use_is_refused_in_one_line(monkeypatch):
    """--device mps (a real device type, but not one the scripts run on) and, on a PyTorch that sees
    no GPU (faked, so a GPU machine tests it too), --device cuda are refused in one line each."""
    arpg.check_device("cpu")
    with pytest.raises(ValueError, match="--device mps: only cpu and cuda are supported"):
        arpg.check_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"--device {name}: this PyTorch sees no CUDA GPU \(a CPU-only build, "
                                             r"or no driver\); use --device cpu"):
            arpg.check_device(name)


def test_a_model_built_on_the_meta_device_takes_storage_with_to_empty():
    """Built on the meta device (no memory), then given storage by to_empty and loaded, as large
    models are: its RoPE table is built again and the model computes what a normal one does."""
    reference = small_model()
    with torch.device("meta"):
        model = ARPG(reference.config)
    model.to_empty(device="cpu").load_state_dict(reference.state_dict())
    model.eval()                                                          # as the reference: no label dropout
    assert torch.equal(model.rope, reference.rope), "the RoPE table was not rebuilt"
    tokens, labels, order = torch.randint(0, 64, (2, 16)), torch.tensor([0, 1]), torch.arange(16).expand(2, 16)
    assert torch.equal(model(tokens, labels, order)[0], reference(tokens, labels, order)[0]), \
        "the logits differ from the reference model's"


def test_no_tensor_is_made_on_the_cpu_behind_the_model_s_back(meta_arpg):
    """A tensor made without device= lands on the CPU, and on a GPU that is an error no CPU test
    sees. On the meta device (the meta_arpg fixture, tests/conftest.py) a training step and both
    decoding paths (guided, top-k and top-p, a larger grid whose RoPE table is built anew) must
    run through."""
    model, tokens, labels = meta_arpg
    logits, loss = model(tokens, labels)
    loss.backward()
    assert logits.device.type == "meta" and model.head.weight.grad.device.type == "meta", \
        f"expected logits and gradient on meta, got {logits.device} and {model.head.weight.grad.device}"
    for fast in (False, True):
        sampled = model.generate(labels, steps=4, cfg_scale=3.0, top_k=10, top_p=0.8, grid=(4, 5), fast=fast)
        assert sampled.shape == (2, 20) and sampled.device.type == "meta", f"fast={fast}"
