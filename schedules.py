"""
Decoding schedules (SPEC 6), the default sampling settings and their check, in plain Python:
shared by arpg.py, train.py, sample.py, export.py and onnx_sampler.py.

They live in a file of their own, free of torch and numpy, so that the ONNX Runtime sampler,
which must run without PyTorch, uses the very same rules as `ARPG.generate`.
"""
import math

MASK_SCHEDULES = {
    # Fraction of the canvas still masked after step s of S (s = step + 1). For 256 tokens in 32
    # steps, arccos (the paper's recommendation) reveals 5-6 tokens a step for most of the run and
    # saves many for the end (..., 11, 14, 17, 40); cosine starts with single tokens and grows to
    # about 12 a step (1, 1, 1, 2, 3, ..., 13, 12). Each is the official code's arithmetic in its
    # order: cosine's ((pi/2) * s) / S rounds differently from (pi/2) * (s / S) where cos lands
    # next to a multiple of 1/L, and then a count moves by one (256 tokens: 39, 51, 63, ... steps).
    "arccos": lambda s, S: math.acos(s / S) / (math.pi / 2),
    "cosine": lambda s, S: math.cos(math.pi / 2 * s / S),
}


def reveal_counts(length: int, steps: int, schedule: str = "arccos") -> list:
    """How many tokens each of `steps` steps reveals, summing to `length` (the official rule): after
    each step but the last, int(length * ratio) tokens stay masked, at least 1 and fewer than were
    masked before it; the last step reveals all that remain. So every step reveals a token at
    least (tests check it for every step count on grids of 16, 64, 256 and 1024 tokens).
    """
    if not 1 <= steps <= length:  # callers check this with their own wording first; this is the rule's own guard
        raise ValueError(f"steps must be between 1 and the {length} tokens to reveal, got {steps}")
    counts, done = [], 0
    for step in range(steps):
        masked = length - done
        if step == steps - 1:
            n = masked                                                     # the last step takes all that remain
        else:
            still_masked = max(1, min(masked - 1, int(length * MASK_SCHEDULES[schedule](step + 1, steps))))
            n = masked - still_masked
        counts.append(n)
        done += n
    return counts


def default_steps(tokens: int) -> int:
    """The samplers' step count when none is given: 32, or one per token on a canvas of fewer."""
    return min(32, tokens)


CFG_SCHEDULES = {
    # Guidance g_s for a step after which a fraction `filled` of the canvas is known.
    "linear": lambda scale, filled: 1.0 + (scale - 1.0) * filled,
    "constant": lambda scale, filled: scale,
}


def check_decoding(schedule, cfg_schedule, temperature, top_k, top_p, cfg_scale):
    """Refuse decoding settings that cannot work, saying why (both samplers call it first)."""
    if schedule not in MASK_SCHEDULES or cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"schedule must be one of {list(MASK_SCHEDULES)} and cfg_schedule one of "
                         f"{list(CFG_SCHEDULES)}, got {schedule!r} and {cfg_schedule!r}")
    if not (math.isfinite(temperature) and math.isfinite(cfg_scale)):  # NaN or inf would sample garbage
        raise ValueError(f"temperature and guidance must be finite numbers, got {temperature} and {cfg_scale}")
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature (0: nearly greedy) and top-k (0: off) must be 0 or more, got {temperature} "
                         f"and {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1], got {top_p}")


# Guidance, decoding schedule and nucleus sampling for a checkpoint (or an export) that names none:
# official files and older ones of ours get the paper's linear guidance schedule (up to 4, our
# choice: the authors recommend 5.0 / 6.0 / 7.5 for L / XL / XXL at 64 steps, SPEC 6, so pass
# --cfg for their numbers), its arccos schedule and top-p off. train.py saves its recipe's own
# under "sampling".
SAMPLING_DEFAULTS = {"cfg_scale": 4.0, "cfg_schedule": "linear", "schedule": "arccos", "top_p": 1.0}


def sampling_settings(args, defaults):
    """SAMPLING_DEFAULTS' four settings: from the command line where given (args.cfg, .cfg_schedule,
    .schedule, .top_p; None = not given), else from `defaults` (a checkpoint's or an export's)."""
    flags = {"cfg_scale": args.cfg, "cfg_schedule": args.cfg_schedule, "schedule": args.schedule, "top_p": args.top_p}
    return {key: defaults[key] if value is None else value for key, value in flags.items()}
