"""carat.train.optim: parameter groups, AdamW, the warmup / linear-decay / epoch-decay schedule."""

import pytest
import torch
from torch import nn

from carat.errors import ConfigError
from carat.train.optim import (
    TINY_OVERRIDES,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    param_groups,
    scheduler_factory,
)


class ToyEncoder(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)


class ToyCARAT(nn.Module):
    """The module names the optimizer relies on (contract: text/visual/audio_encoder) plus fusion parts."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.text_encoder = ToyEncoder(d)
        self.visual_encoder = ToyEncoder(d)
        self.audio_encoder = ToyEncoder(d)
        self.text_encoder_like = nn.Linear(d, d)   # a prefix of a name, not a module under it
        self.fusion = nn.Linear(3 * d, d)
        self.head_norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, 6, bias=False)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)


def _group_of(groups, param):
    return [g["name"] for g in groups if any(p is param for p in g["params"])]


def test_param_groups_partition_and_exclusions():
    model, cfg = ToyCARAT(), OptimConfig()
    groups = param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["base_lr/decay", "base_lr/no_decay", "coef_lr/decay",
                                           "coef_lr/no_decay"]          # full lr first: get_last_lr()[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert all(p.requires_grad for p in grouped)        # the frozen layer is left out
    by = {g["name"]: g for g in groups}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        slow = name.split(".")[0] in ("text_encoder", "visual_encoder", "audio_encoder")
        decay = p.ndim > 1                               # biases, LayerNorm weights, scalars: no decay
        assert _group_of(groups, p) == [f"{'coef_lr' if slow else 'base_lr'}/{'decay' if decay else 'no_decay'}"], name
    assert _group_of(groups, model.text_encoder_like.weight) == ["base_lr/decay"]
    assert _group_of(groups, model.temperature) == ["base_lr/no_decay"]
    assert by["coef_lr/decay"]["weight_decay"] == 0.01 and by["coef_lr/no_decay"]["weight_decay"] == 0.0
    assert by["coef_lr/decay"]["lr"] == pytest.approx(3e-6) and by["coef_lr/decay"]["lr_scale"] == 0.1
    assert by["base_lr/decay"]["lr"] == pytest.approx(3e-5) and by["base_lr/decay"]["lr_scale"] == 1.0


def test_decay_input_norm_decays_what_the_reference_decays():
    # The reference decays every parameter whose name contains neither "bias" nor "LayerNorm"; through the parity
    # test's name table (its unaligned case has every kind of parameter) that is carat's decayed set with
    # decay_input_norm, and carat's own rule differs from it by the three input LayerNorm weights only.
    from carat.model import CARAT
    from tests.test_reference_parity import golden, name_table, reference_configs

    g = golden("b")
    model = CARAT.from_config(reference_configs(g)[0])
    table = name_table(g.config["layers"], g.aligned)
    reference = {ours for theirs, ours in table.items() if "bias" not in theirs and "LayerNorm" not in theirs}

    def decayed(cfg):
        ids = {id(p) for group in param_groups(model, cfg) if group["weight_decay"] > 0 for p in group["params"]}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    assert decayed(OptimConfig(decay_input_norm=True)) == reference
    assert reference - decayed(OptimConfig()) == {"text_norm.weight", "visual_norm.weight", "audio_norm.weight"}


def test_wrapped_model_names_still_match():
    wrapper = nn.Module()
    wrapper.module = ToyCARAT()
    groups = param_groups(wrapper, OptimConfig())
    assert _group_of(groups, wrapper.module.audio_encoder.proj.weight) == ["coef_lr/decay"]


def test_unmatched_coef_lr_module_is_a_config_error():
    with pytest.raises(ConfigError, match=r"coef_lr_modules entries \['txt_encoder'\] match no trainable"):
        param_groups(ToyCARAT(), OptimConfig(coef_lr_modules=("txt_encoder", "audio_encoder")))


def test_optimizer_applies_coef_lr_and_excludes_decay():
    torch.manual_seed(0)
    model = ToyCARAT()
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["betas"] == (0.9, 0.999)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    opt.step()
    # First Adam step with bias correction moves each weight by ~lr * sign(grad) (+ decoupled decay).
    enc_step = (before["text_encoder.norm.bias"] - model.text_encoder.norm.bias).abs().max().item()
    fusion_step = (before["fusion.bias"] - model.fusion.bias).abs().max().item()
    assert enc_step == pytest.approx(1e-3, rel=1e-3) and fusion_step == pytest.approx(1e-2, rel=1e-3)
    # Zero gradient: only decoupled weight decay moves a parameter, and only in the decay groups.
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt2 = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    w, b = model.fusion.weight.detach().clone(), model.head_norm.weight.detach().clone()
    opt2.step()
    torch.testing.assert_close(model.fusion.weight, w * (1 - 1e-2 * 0.1))
    torch.testing.assert_close(model.head_norm.weight, b)
    assert torch.equal(model.frozen.weight, before["frozen.weight"])


def test_lr_multiplier_key_steps():
    cfg = OptimConfig()                      # warmup 0.2, epoch decay 0.98
    total, per_epoch = 100, 10
    assert lr_multiplier(0, total, per_epoch, cfg) == 0.0
    assert lr_multiplier(10, total, per_epoch, cfg) == pytest.approx(0.5 * 0.98)          # mid-warmup, epoch 1
    assert lr_multiplier(20, total, per_epoch, cfg) == pytest.approx(1.0 * 0.98 ** 2)     # end of warmup = peak
    assert lr_multiplier(60, total, per_epoch, cfg) == pytest.approx(0.5 * 0.98 ** 6)     # middle of decay
    assert lr_multiplier(99, total, per_epoch, cfg) == pytest.approx(0.0125 * 0.98 ** 9)
    assert lr_multiplier(100, total, per_epoch, cfg) == 0.0
    assert lr_multiplier(150, total, per_epoch, cfg) == 0.0                              # never negative
    # Epoch boundary: the last step of epoch 3 and the first of epoch 4 differ by the 0.98 factor.
    assert lr_multiplier(39, total, per_epoch, cfg) == pytest.approx((61 / 80) * 0.98 ** 3)
    assert lr_multiplier(40, total, per_epoch, cfg) == pytest.approx((60 / 80) * 0.98 ** 4)
    no_warmup = OptimConfig(warmup_fraction=0.0, epoch_decay=1.0)
    assert lr_multiplier(0, total, per_epoch, no_warmup) == 1.0
    assert lr_multiplier(50, total, per_epoch, no_warmup) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="total_steps=0"):
        lr_multiplier(0, 0, 1, cfg)
    with pytest.raises(ValueError, match="step=-1"):
        lr_multiplier(-1, 10, 1, cfg)


def _run(opt, sched, steps):
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_sets_group_lrs_from_lr_scale():
    cfg = OptimConfig()
    model = ToyCARAT()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, total_steps=50, steps_per_epoch=5, cfg=cfg)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    lrs = _run(opt, sched, 50)
    for step, row in enumerate(lrs):
        for g, lr in zip(opt.param_groups, row):
            assert lr == pytest.approx(cfg.lr * g["lr_scale"] * lr_multiplier(step, 50, 5, cfg), abs=1e-15)
    peak = max(range(50), key=lambda s: lrs[s][0])
    assert peak == 10                                       # end of warmup (20% of 50)


def test_scheduler_state_round_trip_resumes_identically():
    cfg = OptimConfig()
    ref_model = ToyCARAT()
    ref_opt = build_optimizer(ref_model, cfg)
    ref_sched = build_scheduler(ref_opt, 40, 8, cfg)
    expected = _run(ref_opt, ref_sched, 40)

    model = ToyCARAT()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, 40, 8, cfg)
    _run(opt, sched, 17)
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    # Round trip through torch.save with the safe loader a checkpoint resume uses.
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt2 = build_optimizer(model, cfg)
    sched2 = scheduler_factory(40, 8, cfg)(opt2)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.last_epoch == 17
    resumed = _run(opt2, sched2, 23)
    for a, b in zip(resumed, expected[17:]):
        assert a == pytest.approx(b, abs=1e-15)

    mismatched = build_scheduler(build_optimizer(model, cfg), 80, 8, cfg)
    with pytest.raises(ConfigError, match="lr schedule"):
        mismatched.load_state_dict(state["sched"])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lr", 0.0, "lr=0.0 must be"),
        ("lr", float("nan"), "lr=nan"),
        ("betas", (0.9, 1.0), "betas="),
        ("eps", -1.0, "eps="),
        ("weight_decay", -0.1, "weight_decay="),
        ("warmup_fraction", 1.0, "warmup_fraction="),
        ("epoch_decay", 0.0, "epoch_decay="),
        ("coef_lr", 0.0, "coef_lr="),
        ("coef_lr_modules", ("",), "coef_lr_modules="),
        ("grad_clip", -1.0, "grad_clip="),
        ("grad_clip", float("nan"), "grad_clip="),
    ],
)
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        OptimConfig(**{field: value})


def test_seed_defaults_and_tiny_overrides():
    cfg = OptimConfig()
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay) == (3e-5, (0.9, 0.999), 1e-6, 0.01)
    assert (cfg.warmup_fraction, cfg.epoch_decay, cfg.coef_lr, cfg.grad_clip) == (0.2, 0.98, 0.1, 1.0)
    tiny = OptimConfig(**TINY_OVERRIDES)                  # valid, and differs from the seed
    assert tiny.lr > cfg.lr
