"""Training-step properties: gradients, no hidden state changes, EMA exactness, queues, precision."""

from __future__ import annotations

import pytest
import torch

from model import ALBEF, ALBEFConfig, build_albef, mask_tokens
from model.distributed import all_gather_no_grad

B, L = 4, 10


def make_batch(cfg: ALBEFConfig, batch: int = B, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    ids = torch.randint(1000, 2000, (batch, L), generator=gen)
    ids[:, 0] = 101
    mask = torch.ones(batch, L, dtype=torch.long)
    mask[-1, 6:] = 0
    ids[mask == 0] = 0
    mlm_ids, labels = mask_tokens(
        ids,
        vocab_size=cfg.text.vocab_size,
        mask_token_id=103,
        special_token_ids=[0, 101, 102],
        probability=0.5,
        generator=gen,
    )
    return {
        "image": torch.randn(batch, 3, size, size, generator=gen),
        "input_ids": ids,
        "attention_mask": mask,
        "mlm_input_ids": mlm_ids,
        "mlm_labels": labels,
        "alpha": 0.4,
    }


@pytest.fixture
def tiny() -> ALBEF:
    torch.manual_seed(0)
    return build_albef(ALBEFConfig.tiny(queue_size=16, vocab_size=3000))


def snapshot(model: ALBEF) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_every_trainable_param_gets_a_grad_and_momentum_none(tiny: ALBEF) -> None:
    out = tiny(**make_batch(tiny.config))
    out.loss.backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    for twin in tiny.momentum_twins():
        assert not list(twin.parameters()), "momentum twins must hold no parameters"
        assert all(not b.requires_grad and b.grad is None for b in twin.buffers())
    assert {n.split(".")[0] for n, _ in tiny.named_parameters()} == {
        "visual_encoder",
        "text_encoder",
        "vision_proj",
        "text_proj",
        "itm_head",
        "temp",
    }
    for name in ("itc_loss", "itm_loss", "mlm_loss"):
        value = getattr(out, name)
        assert value.dtype == torch.float32 and value.dim() == 0 and torch.isfinite(value)
    assert out.image_feat_m.shape == (B, tiny.config.embed_dim) and not out.image_feat_m.requires_grad
    assert torch.equal(out.loss, sum(out.losses().values())) and set(out.losses()) == {
        "itc_loss",
        "itm_loss",
        "mlm_loss",
    }
    assert out.metrics() == {"itc_acc": out.itc_acc, "itm_acc": out.itm_acc, "temp": out.temp}
    assert out.queue_update() == {"image_feat_m": out.image_feat_m, "text_feat_m": out.text_feat_m}


def test_forward_mutates_nothing(tiny: ALBEF) -> None:
    with torch.no_grad():
        tiny.temp.fill_(0.9)  # above the clamp range: forward must clamp functionally
    before = snapshot(tiny)
    out = tiny(**make_batch(tiny.config))
    out.loss.backward()
    after = snapshot(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before), [
        k for k in before if not torch.equal(before[k], after[k])
    ]
    assert out.temp.item() == pytest.approx(0.5)
    assert tiny.temp.grad.item() == 0.0  # clamped: no gradient through the bound


def test_twins_start_equal_and_do_not_alias(tiny: ALBEF) -> None:
    assert torch.equal(tiny.visual_encoder.pos_embed, tiny.visual_encoder_m.pos_embed)
    with torch.no_grad():
        tiny.visual_encoder.pos_embed.add_(1.0)
    assert not torch.equal(tiny.visual_encoder.pos_embed, tiny.visual_encoder_m.pos_embed)
    tiny.copy_params()
    assert torch.equal(tiny.visual_encoder.pos_embed, tiny.visual_encoder_m.pos_embed)


def test_momentum_modes(tiny: ALBEF) -> None:
    tiny.train()
    assert tiny.text_encoder.training and not any(t.training for t in tiny.momentum_twins())
    official_like = build_albef(ALBEFConfig.tiny(queue_size=16, vocab_size=3000, momentum_dropout=True)).train()
    assert all(t.training for t in official_like.momentum_twins())


def expected_ema(twin: torch.Tensor, theta: torch.Tensor, m: float) -> torch.Tensor:
    return twin * m + theta.float() * (1.0 - m)  # fp32 arithmetic, the official formula


def ema_check(model: ALBEF) -> None:
    """Perturb the trained weights, take one EMA step, compare every twin tensor bit-exactly."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p, dtype=torch.float32).to(p.dtype) * 0.1)
    twins, sources = model._ema_lists()
    expected = [expected_ema(t.clone(), s.detach(), model.config.momentum) for t, s in zip(twins, sources)]
    model.momentum_update()
    twins_after, _ = model._ema_lists()
    for t, e in zip(twins_after, expected):
        assert t.dtype == torch.float32
        assert torch.equal(t, e)


def test_ema_step_is_exact_in_fp32(tiny: ALBEF) -> None:
    ema_check(tiny)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_keeps_momentum_fp32(tiny: ALBEF, dtype: torch.dtype) -> None:
    twins_before = {k: v.clone() for k, v in tiny.state_dict().items() if "_m." in k}
    tiny.to(dtype)
    assert all(p.dtype == dtype for p in tiny.parameters())
    state = tiny.state_dict()
    for k, v in twins_before.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v), f"{k} was cast/rounded"
    assert tiny.image_queue.dtype == tiny.text_queue.dtype == torch.float32
    ema_check(tiny)
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
    except RuntimeError:
        pytest.skip(f"CPU matmul in {dtype} not supported here")
    out = tiny(**make_batch(tiny.config))
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.losses().values())
    assert out.image_feat_m.dtype == torch.float32


def test_deepspeed_style_param_cast_skips_momentum(tiny: ALBEF) -> None:
    """DeepSpeed casts `module.parameters()` in place (`p.data = p.data.to(dtype)`): twins hold none."""
    for p in tiny.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for twin in tiny.momentum_twins() for b in twin.buffers())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(**make_batch(tiny.config))
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.losses().values())


def test_autocast_forward_matches_fp32_roughly(tiny: ALBEF) -> None:
    batch = make_batch(tiny.config)
    tiny.eval()
    with torch.no_grad():
        ref = tiny(**batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(**batch, neg_image_idx=ref.neg_image_idx, neg_text_idx=ref.neg_text_idx)
    for name in ("itc_loss", "itm_loss", "mlm_loss"):
        assert getattr(low, name).dtype == torch.float32
        assert getattr(low, name).item() == pytest.approx(getattr(ref, name).item(), rel=0.05)


def test_enqueue_writes_at_pointer_and_wraps(tiny: ALBEF) -> None:
    q = tiny.config.queue_size
    feats = [torch.nn.functional.normalize(torch.randn(B, tiny.config.embed_dim), dim=1) for _ in range(q // B)]
    for i, f in enumerate(feats):
        tiny.enqueue(f, -f)
        assert int(tiny.queue_ptr) == ((i + 1) * B) % q
    assert torch.equal(tiny.image_queue, torch.cat(feats).t())
    assert torch.equal(tiny.text_queue, -torch.cat(feats).t())
    with pytest.raises(ValueError, match=r"queue_size=16 must be a multiple .*= 3"):
        tiny.enqueue(torch.zeros(3, tiny.config.embed_dim), torch.zeros(3, tiny.config.embed_dim))
    tiny.enqueue(torch.zeros(4, tiny.config.embed_dim), torch.zeros(4, tiny.config.embed_dim))  # ptr 4
    with pytest.raises(ValueError, match="overruns"):
        tiny.enqueue(torch.zeros(16, tiny.config.embed_dim), torch.zeros(16, tiny.config.embed_dim))


def test_queues_are_unit_norm_and_rank_independent() -> None:
    a = build_albef(ALBEFConfig.tiny(queue_size=16, vocab_size=3000))
    torch.manual_seed(123)  # a different global RNG state (another rank) must not change the queues
    b = build_albef(ALBEFConfig.tiny(queue_size=16, vocab_size=3000))
    assert torch.equal(a.image_queue, b.image_queue) and torch.equal(a.text_queue, b.text_queue)
    assert not torch.equal(a.image_queue, a.text_queue)
    torch.testing.assert_close(a.image_queue.norm(dim=0), torch.ones(16))


def test_all_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 4)
    assert all_gather_no_grad(x) is x


def test_batch_of_two_trains_and_one_is_refused(tiny: ALBEF) -> None:
    out = tiny(**make_batch(tiny.config, batch=2))
    assert torch.equal(out.neg_image_idx, torch.tensor([1, 0])) and torch.equal(out.neg_text_idx, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="at least 2"):
        tiny(**make_batch(tiny.config, batch=1))


def test_no_masked_token_gives_zero_mlm_loss(tiny: ALBEF) -> None:
    batch = make_batch(tiny.config)
    batch["mlm_input_ids"], batch["mlm_labels"] = batch["input_ids"], torch.full_like(batch["input_ids"], -100)
    out = tiny(**batch)
    assert out.mlm_loss.item() == 0.0 and out.mlm_loss.requires_grad
