"""The drop-in bugs found by running torch's own test files against nanops (each failed before
its fix): GradScaler with closures, sparse grads and two optimizers; MultiheadAttention with
is_causal, TorchScript, autocast weights, nested tensors, subclasses and float masks; watch with
forward hooks; a failing locator in Guard."""
import copy
import io
import pickle
import warnings

import pytest
import torch

import nanops
from nanops.nn import MultiheadAttention


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


# ---- GradScaler with AMP off ---------------------------------------------------------------------

def test_disabled_scaler_checks_the_grads_a_closure_makes():
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = nanops.GradScaler("cpu", enabled=False)
    x = torch.randn(4, 6)
    weights = copy.deepcopy(model.state_dict())

    def poisoned():
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        model[0].weight.grad[0, 0] = float("nan")
        return loss

    loss = scaler.step(optimizer, poisoned)
    assert scaler.last_step_skipped and torch.isfinite(loss)
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters())

    calls = []

    def healthy():
        calls.append(1)
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    scaler.step(optimizer, closure=healthy)
    assert not scaler.last_step_skipped and len(calls) == 1  # the step used the checked evaluation
    twin_opt.zero_grad()
    twin(x).square().mean().backward()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_disabled_scaler_with_lbfgs_closure_steps_like_torch():
    def run(scaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
        x, y = torch.randn(8, 3), torch.randn(8, 1)

        def closure():
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            return loss

        scaler.step(opt, closure)
        return [p.detach().clone() for p in model.parameters()]

    for ours, ref in zip(run(nanops.GradScaler("cpu", enabled=False)), run(torch.amp.GradScaler("cpu", enabled=False))):
        torch.testing.assert_close(ours, ref)


def test_enabled_scaler_refuses_closures_as_torch():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = nanops.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 6)).sum()).backward()
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: None)


def test_disabled_scaler_checks_sparse_grads():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    scaler = nanops.GradScaler("cpu", enabled=False)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert not scaler.last_step_skipped and not torch.equal(emb.weight, before)
    opt.zero_grad()
    emb(torch.tensor([3])).sum().backward()
    with torch.no_grad():
        emb.weight.grad._values().fill_(float("nan"))
    before = emb.weight.detach().clone()
    scaler.step(opt)
    assert scaler.last_step_skipped and torch.equal(emb.weight, before)


@pytest.mark.parametrize("order", ["o0 then o1", "o1 then o0"])
@pytest.mark.parametrize("amp", [False, True])
def test_two_models_two_optimizers_restore_the_state_before_the_batch(order, amp):
    # torch's test_grad_scaling_multiple pattern: a corrupt batch reaches m1 only; whichever
    # optimizer steps first, m1's BatchNorm statistics come back to before the batch and m0's
    # keep what its healthy step saw.
    m0, m1 = small_net(), small_net()
    o0, o1 = torch.optim.SGD(m0.parameters(), lr=0.1), torch.optim.SGD(m1.parameters(), lr=0.1)
    scaler = nanops.GradScaler("cpu", enabled=amp, init_scale=4.0).protect(m0).protect(m1)
    x = torch.randn(4, 6)
    for step in range(2):
        batch = x + step
        bad = batch.clone()
        if step == 1:
            bad[0, 0] = float("inf")
        before0 = copy.deepcopy(m0[1].state_dict())
        before1 = copy.deepcopy(m1[1].state_dict())
        loss = m0(batch).square().mean() + m1(bad).square().mean()
        scaler.scale(loss).backward()
        after0 = copy.deepcopy(m0[1].state_dict())
        for opt in ((o0, o1) if order == "o0 then o1" else (o1, o0)):
            scaler.step(opt)
        scaler.update()
        o0.zero_grad()
        o1.zero_grad()
        if step == 1:
            for k, v in m1[1].state_dict().items():
                assert torch.equal(v, before1[k]), k
            for k in ("running_mean", "running_var", "num_batches_tracked"):
                assert torch.equal(m0[1].state_dict()[k], after0[k]), k
            assert not torch.equal(after0["running_mean"], before0["running_mean"])


# ---- MultiheadAttention ----------------------------------------------------------------------------

def test_is_causal_without_weights_uses_the_causal_hint_as_torch():
    # torch's is_causal_kernels: a (2, 2) mask for a length-1 sequence is ignored when the
    # hint can stand in for it (no weights, no key padding mask).
    qkv = torch.ones(1, 2, 4)
    for cls in (torch.nn.MultiheadAttention, MultiheadAttention):
        mha = cls(4, 1)
        mha.in_proj_weight = torch.nn.Parameter(torch.ones(12, 4))
        mha.out_proj.weight = torch.nn.Parameter(torch.ones(4, 4))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(qkv.size(1))
        out, _ = mha(qkv, qkv, qkv, attn_mask=mask, need_weights=False, is_causal=True)
        assert torch.equal(out, torch.full((1, 2, 4), 16.0)), cls
    # A real causal case: the hint gives what the mask gives.
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(8, 2)
    ours = MultiheadAttention(8, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 8)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
    torch.testing.assert_close(ours(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0],
                               ref(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0])


def test_train_with_is_causal_through_a_patched_transformer_encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=2, dim_feedforward=4, nhead=1, batch_first=True,
                                             activation="gelu", dropout=0)
    encoder = torch.nn.TransformerEncoder(layer, 2)
    nanops.patch(encoder)
    inputs = torch.randn(1, 2, 2)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(2)
    out = encoder(inputs, mask=mask, is_causal=True)
    torch.nn.functional.mse_loss(out, inputs).backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_refuses_in_one_line_and_patch_refuses_script_modules():
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(MultiheadAttention(8, 2))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model.append(torch.nn.MultiheadAttention(8, 2))
    nanops.patch(model)
    with pytest.raises(RuntimeError, match=r"nanops.unpatch\(model\) first"):
        torch.jit.script(model[1])
    assert isinstance(model[1], MultiheadAttention)  # the failed scripting changed nothing
    nanops.unpatch(model)
    torch.jit.script(model[1])  # torch's own attention scripts
    with pytest.raises(TypeError, match="ScriptModule"):
        nanops.patch(torch.jit.script(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_weights_have_torchs_dtype(dtype):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(8, 2)
    ours = MultiheadAttention(8, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 8)
    with torch.autocast("cpu", dtype=dtype):
        out_ref, w_ref = ref(x, x, x)
        out, w = ours(x, x, x)
    assert (out.dtype, w.dtype) == (out_ref.dtype, w_ref.dtype)
    torch.testing.assert_close(w.float(), w_ref.float(), atol=2e-2, rtol=2e-2)


def test_float_mask_of_another_dtype_is_refused_as_torch():
    ours = MultiheadAttention(8, 2)
    x = torch.randn(5, 3, 8)
    with pytest.raises(RuntimeError):
        torch.nn.MultiheadAttention(8, 2)(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        ours(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.float64))
    ours(x, x, x, attn_mask=torch.zeros(5, 5))  # its own dtype is fine


def test_nested_tensor_inputs_behave_as_in_torch():
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    ours = MultiheadAttention(8, 2, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    nt = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], layout=torch.jagged)
    outcomes = []
    for mha in (ref, ours):
        try:
            outcomes.append(("ok", mha(nt, nt, nt, need_weights=False)[0].to_padded_tensor(0.0)))
        except Exception as err:
            outcomes.append((type(err), str(err)))
    assert outcomes[0][0] == outcomes[1][0]
    if outcomes[0][0] == "ok":
        torch.testing.assert_close(outcomes[0][1], outcomes[1][1])
    else:
        assert outcomes[0][1] == outcomes[1][1]


class _PlainSubclass(torch.nn.MultiheadAttention):
    label = "aifi-like"


class _OwnForward(torch.nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_subclasses_with_torchs_forward_are_patched_others_named():
    model = torch.nn.ModuleList([torch.nn.MultiheadAttention(8, 2), _PlainSubclass(8, 2), _OwnForward(8, 2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert nanops.patch(model) == 2
    assert any("_OwnForward" in str(w.message) for w in caught)
    assert isinstance(model[1], MultiheadAttention) and isinstance(model[1], _PlainSubclass)
    assert model[1].label == "aifi-like" and type(model[2]) is _OwnForward
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded] == [torch.nn.MultiheadAttention, _PlainSubclass, _OwnForward]
    assert type(copy.deepcopy(model)[1]) is type(model[1])
    assert nanops.unpatch(model) == 2 and type(model[1]) is _PlainSubclass


# ---- watch and a forward hook that changes a module's output ------------------------------------

def _poison(module, args, out):
    return out * float("nan")


def test_watch_checks_what_a_module_returns_after_its_own_hooks():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].register_forward_hook(_poison)
    with nanops.watch(model) as w:
        model(torch.randn(2, 4)).sum().backward()
        finding = w.check()
    assert (finding.module, finding.phase) == ("1", "forward")
    assert nanops.locate_forward(model, torch.randn(2, 4)).module == "1"
    assert len(model[1]._forward_hooks) == 1  # nothing of watch is left on the model
    pickle.dumps(model)
    copy.deepcopy(model)


@pytest.mark.slow
def test_watch_names_the_hooked_yolov5_module():
    model = nanops.yolov5.build_transformer_model().train()
    model.model[8].register_forward_hook(_poison)
    finding = nanops.locate_forward(model, torch.randn(1, 3, 64, 64))
    assert finding.module == "model.8", finding


# ---- Guard with a locator that raises ------------------------------------------------------------

def test_a_failing_locator_leaves_the_skip_counted_and_reports_its_error():
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = nanops.Guard(model, optimizer)
    x = torch.randn(4, 6)
    model(x).square().mean().backward()
    model[0].weight.grad[0, 0] = float("inf")

    def broken():
        raise ValueError("the batch is gone")

    result = guard.step(locate=broken)
    assert result.skipped and guard.skipped_steps == 1
    assert all(p.grad is None for p in model.parameters())
    assert result.finding.phase == "replay failed" and "the batch is gone" in result.finding.module
    assert "the batch is gone" in str(result.finding)
