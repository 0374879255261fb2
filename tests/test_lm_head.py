"""The dense CPU LM head (tasks/lm_head.py) against TRL's own tiled function: the same per-token values
and gradients, only the labelled positions scored, TRL's path kept for batches too large to hold."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import add_fused_lm_head

from tasks import lm_head

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture(autouse=True)
def trl_restored():
    lm_head.restore_trl()
    yield
    lm_head.restore_trl()


def _problem(seed: int, n: int = 37, h: int = 16, v: int = 101, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():  # every third row's target is its top-1 token, so that is_top1 has both values
        targets[::3] = torch.nn.functional.linear(hidden, weight, b).argmax(-1)[::3]
    return hidden, weight, b, targets


def _grads(outs, *params):
    log_probs, entropy = outs[0], outs[1]
    loss = -log_probs.sum() + 0.3 * entropy.sum()  # an entropy term, as an entropy bonus trains one
    return torch.autograd.grad(loss, [p for p in params if p is not None])


@pytest.mark.parametrize(
    "temperature,softcap,scale,bias",
    [(1.0, None, 1.0, False), (0.7, None, 1.0, True), (1.0, 30.0, 0.5, False), (0.9, 5.0, 2.0, True)],
)
def test_dense_head_matches_trls_tiled_function_in_values_and_gradients(temperature, softcap, scale, bias):
    hidden, weight, b, targets = _problem(0, bias=bias)
    # chunk 32 over a 101-token vocabulary: TRL folds four tiles, one of them partial
    trl = ChunkedLogProbFunction.apply(hidden, weight, b, targets, temperature, 32, softcap, scale, ALL)
    dense = lm_head.dense_log_probs(hidden, weight, b, targets, temperature, softcap, scale, ALL)
    for name, a, d in zip(ALL, trl, dense, strict=True):
        if name == "is_top1":
            assert torch.equal(a, d) and 0 < int(d.sum()) < len(d), name
        else:
            torch.testing.assert_close(d, a, rtol=1e-5, atol=1e-5, msg=name)
    for a, d in zip(_grads(trl, hidden, weight, b), _grads(dense, hidden, weight, b), strict=True):
        torch.testing.assert_close(d, a, rtol=1e-4, atol=1e-5)


def test_a_tie_with_an_earlier_token_is_not_a_top1_in_either_head():
    hidden = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    hidden[:, 0] = 3.0
    weight = torch.zeros(8, 16)
    weight[2, 0] = weight[5, 0] = 1.0  # tokens 2 and 5 tie for the maximum logit, 3.0
    targets = torch.tensor([5, 2, 5, 2])
    trl = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 4, None, 1.0, ALL)
    dense = lm_head.dense_log_probs(hidden, weight, None, targets, 1.0, None, 1.0, ALL)
    assert dense[4].tolist() == trl[4].tolist() == [False, True, False, True]


def _fused_outputs(model, ids, labels):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    grad = torch.autograd.grad(out.loss, model.model.layers[-1].mlp.down_proj.weight)[0]
    return out, grad


def test_the_trainers_forward_scores_only_labelled_positions_and_agrees_with_trl(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100  # a prompt the loss never sees
    labels[2, 15:] = -100  # and a padded tail

    trl_out, trl_grad = _fused_outputs(model, ids, labels)
    assert lm_head.use_dense_on_cpu() and lm_head.use_dense_on_cpu()  # idempotent
    seen = []
    dense = lm_head.dense_log_probs
    monkeypatch.setattr(lm_head, "dense_log_probs", lambda h, *a: seen.append(h.shape[0]) or dense(h, *a))
    out, grad = _fused_outputs(model, ids, labels)

    assert seen == [int((labels[:, 1:] != -100).sum())]  # 7 + 7 + 2 positions, not 3 x 19
    torch.testing.assert_close(out.loss, trl_out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-4, atol=1e-6)
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(out, name), getattr(trl_out, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1, trl_out.is_top1)
    assert (
        float(out.log_probs.detach()[:, :11].abs().sum()) == 0.0
    )  # unlabelled positions read zero, as in TRL


def test_a_batch_too_large_to_hold_keeps_trls_tiled_path(monkeypatch):
    hidden, weight, _, targets = _problem(2)
    assert lm_head.use_dense_on_cpu()
    called = []
    monkeypatch.setattr(lm_head, "dense_log_probs", lambda *a: called.append(1))
    monkeypatch.setattr(lm_head, "DENSE_MAX_ELEMENTS", hidden.shape[0] * weight.shape[0] - 1)
    out = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32, None, 1.0, ALL)
    expected = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32, None, 1.0, ALL)
    assert not called
    torch.testing.assert_close(out[0], expected[0])


def test_restore_puts_trls_own_names_back():
    original = (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton)
    assert original[0] is ChunkedLogProbFunction
    lm_head.use_dense_on_cpu()
    assert trl_utils._ChunkedLogProbFunction is not ChunkedLogProbFunction
    assert trl_utils._use_triton(torch.device("cpu"))  # TRL then passes only the labelled positions
    lm_head.restore_trl()
    assert (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton) == original
    assert not trl_utils._use_triton(torch.device("cpu"))


def test_a_microbatch_with_no_labelled_position_trains_as_a_zero(tiny_model):
    """As in TRL: a batch whose every label is masked (a long prompt truncated before its answer)
    gives a finite zero loss that backward still runs through."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    add_fused_lm_head(model)
    assert lm_head.use_dense_on_cpu()
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    out, grad = _fused_outputs(model, ids, torch.full_like(ids, -100))
    assert float(out.loss) == 0.0 and float(grad.abs().sum()) == 0.0
