"""nanops.huggingface.protect in a real Accelerate loop and a real transformers Trainer (CPU): one
corrupt batch skipped with AMP off (and bf16), weights, optimizer state, BatchNorm statistics and
the LR schedule as in a run without that batch, the module named, the skip in the Trainer's logs."""
import math

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")
import nanops.huggingface  # noqa: E402
from tiny_models import TinyAttentionNet as Tiny  # noqa: E402

BATCH, CORRUPT = 8, 2


def examples(corrupt: bool, drop: bool = False):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6 * BATCH, 16, generator=g), torch.randn(6 * BATCH, 1, generator=g)
    if corrupt:
        x[CORRUPT * BATCH + 3, 5] = math.nan
    keep = [i for i in range(len(x)) if not (drop and i // BATCH == CORRUPT)]
    return x[keep], y[keep]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # each test builds its own Accelerator
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def accelerate_loop(corrupt, drop=False, mixed_precision="no", accumulation=1, protected=True):
    model = Tiny()
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision,
                                         gradient_accumulation_steps=accumulation)
    protection = nanops.huggingface.protect(accelerator) if protected else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*examples(corrupt, drop)), batch_size=BATCH)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x).float(), y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    if protection is not None:
        protection.close()
    return accelerator.unwrap_model(model), optimizer, scheduler, protection


def test_an_accelerate_loop_skips_the_corrupt_batch_as_if_it_had_not_been_there():
    model, optimizer, scheduler, protection = accelerate_loop(corrupt=True)
    ref, ref_optimizer, ref_scheduler, _ = accelerate_loop(corrupt=False, drop=True)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(optimizer.optimizer.state[p]["momentum_buffer"],
                                   ref_optimizer.optimizer.state[q]["momentum_buffer"], rtol=0, atol=0)
    assert scheduler.get_last_lr() == pytest.approx(ref_scheduler.get_last_lr())  # not stepped for the skip
    assert [(s.step, s.first_nonfinite) for s in protection.skips] == [(CORRUPT, "forward of inp")]
    assert protection.scaler.skipped_steps == 1 and protection.scaler.total_steps == 6


def test_bf16_and_accumulation_skip_the_window_and_finish_finite():
    model, _, _, protection = accelerate_loop(corrupt=True, mixed_precision="bf16", accumulation=2)
    assert protection.scaler.total_steps == 3 and protection.scaler.skipped_steps == 1
    assert [s.first_nonfinite for s in protection.skips] == ["forward of inp"]
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_protect_refuses_a_prepared_accelerator_and_other_objects():
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.prepare(torch.optim.SGD(Tiny().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="before accelerator.prepare"):
        nanops.huggingface.protect(accelerator)
    with pytest.raises(TypeError, match="Accelerator or a transformers.Trainer"):
        nanops.huggingface.protect(object())


def trainer_run(tmp_path, corrupt, drop=False, protected=True):
    transformers = pytest.importorskip("transformers")

    class Sequential(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):  # the batches in order, for a bit-exact comparison
            return torch.utils.data.SequentialSampler(self.train_dataset)

    x, y = examples(corrupt, drop)
    dataset = [{"x": a, "labels": b} for a, b in zip(x, y)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                                          num_train_epochs=1, learning_rate=0.05, optim="sgd",
                                          lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1,
                                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Sequential(model=Tiny(), args=args, train_dataset=dataset)
    protection = nanops.huggingface.protect(trainer) if protected else None
    trainer.train()
    return trainer, protection


def test_a_transformers_trainer_run_skips_counts_and_matches_a_run_without_the_batch(tmp_path):
    trainer, protection = trainer_run(tmp_path / "ours", corrupt=True)
    ref, _ = trainer_run(tmp_path / "ref", corrupt=False, drop=True)
    for name, value in ref.model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert [(s.step, s.first_nonfinite) for s in protection.skips] == [(CORRUPT, "forward of inp")]
    logged = [entry["nanops_skipped_steps"] for entry in trainer.state.log_history if "nanops_skipped_steps" in entry]
    assert logged[CORRUPT:] and set(logged[CORRUPT:]) == {1} and set(logged[:CORRUPT]) <= {0}
    assert (tmp_path / "ours" / "nanops_skipped_steps.csv").read_text().count("\n") == 2
