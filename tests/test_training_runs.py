"""What `train` does with a run folder (new / resume / finished / refused, said in the report), no
folder left by a failed run, and training called from inside `torch.inference_mode()` as ComfyUI
calls nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreamrelation_core.data.cache import Encoders, load_prepared, prepare_dataset
from dreamrelation_core.data.synthetic import write_synthetic_dataset
from dreamrelation_core.errors import TrainingError
from dreamrelation_core.lora import peft_triplet as triplet
from dreamrelation_core.mochi.tiny import tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae
from dreamrelation_core.training.config import TrainConfig
from dreamrelation_core.training.runs import RUN_INFO, dataset_identity, execute, plan_run
from dreamrelation_core.training.trainer import Trainer, latest_checkpoint, list_checkpoints


def _prepare(root: Path, caption: str | None = None) -> Path:
    kw = {"caption": caption} if caption else {}
    data = write_synthetic_dataset(root / "data", num_videos=1, num_frames=7, size=(32, 32), **kw)
    prepare_dataset(data, root / "cache", Encoders.from_models(tiny_vae(), tiny_text_encoder(), tiny_tokenizer(16)), 7, (32, 32),
                    max_text_len=16)
    return root / "cache"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return _prepare(tmp_path_factory.mktemp("runs_data"))


def cfg(cache: Path, run: Path, **kw) -> TrainConfig:
    base = dict(cache_dir=str(cache), output_dir=str(run), num_steps=4, warmup_steps=1, checkpoint_every=2, rank=2,
                alpha=2.0, device="cpu", save_dtype="fp32", keep_checkpoints=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture()
def finished(cache, tmp_path) -> Path:
    """A run that reached its num_steps (4)."""
    run = tmp_path / "run"
    assert execute(plan_run(cfg(cache, run), resume=True)).status == "finished"
    return run


def test_resume_on_without_a_run_starts_a_new_run_and_says_so(cache, tmp_path):
    plan = plan_run(cfg(cache, tmp_path / "mistyped"), resume=True)
    assert plan.action == "new" and plan.step == 0
    assert plan.report() == f"No run found at {tmp_path / 'mistyped'}: starting a new run."
    assert not (tmp_path / "mistyped").exists()  # planning writes nothing


def test_finished_run_requeued_unchanged_trains_nothing(cache, finished):
    lora = finished / "relation_only.safetensors"
    before = (lora.stat().st_mtime_ns, [p.name for p in list_checkpoints(finished)])
    plan = plan_run(cfg(cache, finished), resume=True)
    assert plan.action == "finished" and plan.step == 4
    assert "already finished at step 4: nothing to train" in plan.report() and str(lora) in plan.report()
    result = execute(plan)
    assert result.status == "already finished" and result.step == 4 and result.relation_path == lora
    assert len(result.history) == 4  # the saved run's losses, for the plot
    assert (lora.stat().st_mtime_ns, [p.name for p in list_checkpoints(finished)]) == before


def test_finished_run_with_missing_lora_files_writes_them_again_without_training(cache, finished):
    (finished / "relation_only.safetensors").unlink()
    result = execute(plan_run(cfg(cache, finished), resume=True))
    assert result.status == "already finished" and result.relation_path.is_file()
    assert [p.name for p in list_checkpoints(finished)][-1] == "checkpoint_000004.pt"


def test_resume_refuses_every_differing_setting_by_name(cache, finished):
    new = cfg(cache, finished, rank=4, learning_rate=3e-4, seed=7, alpha=8.0)
    with pytest.raises(TrainingError) as e:
        plan_run(new, resume=True)
    msg = str(e.value)
    assert "4 setting(s) differ from the saved run" in msg
    for part in ("rank: saved 2, new 4", "alpha: saved 2.0, new 8.0", "learning_rate: saved 0.0002, new 0.0003",
                 "seed: saved 0, new 7"):
        assert part in msg
    assert "another run name" in msg


def test_resume_applies_num_steps_and_checkpoint_every_and_reports_them(cache, finished):
    plan = plan_run(cfg(cache, finished, num_steps=7, checkpoint_every=3), resume=True)
    assert plan.action == "resume" and plan.step == 4
    report = plan.report()
    assert "Resuming run run at step 4 of 7" in report
    assert "Applied num_steps: 4 -> 7" in report and "Applied checkpoint_every: 2 -> 3" in report
    result = execute(plan)
    assert result.status == "finished" and result.step == 7
    assert [int(p.stem.split("_")[-1]) for p in list_checkpoints(finished)] == [2, 4, 6, 7]  # new interval from 4
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6, 7]


def test_resume_refuses_other_data_and_fewer_steps_than_done(cache, finished, tmp_path):
    other = _prepare(tmp_path / "other", caption="A blue circle is approaching a red square.")
    assert dataset_identity(other) != dataset_identity(cache)
    with pytest.raises(TrainingError, match=r"1 setting\(s\) differ.*data: saved '1 clip\(s\) #\w+', new '1 clip"):
        plan_run(cfg(other, finished), resume=True)
    assert json.loads((finished / RUN_INFO).read_text())["identity"]["data"] == dataset_identity(cache)
    with pytest.raises(TrainingError, match="already at step 4, past num_steps 3"):
        plan_run(cfg(cache, finished, num_steps=3), resume=True)
    with pytest.raises(TrainingError, match="already holds a run .step 4 of 4.: turn resume on"):
        plan_run(cfg(cache, finished), resume=False)
    # a moved cache folder with the same content is the same data
    moved = tmp_path / "moved_cache"
    cache_copy = [(p.name, p.read_bytes()) for p in Path(cache).iterdir()]
    moved.mkdir()
    for name, data in cache_copy:
        (moved / name).write_bytes(data)
    assert plan_run(cfg(moved, finished), resume=True).action == "finished"


def test_overwrite_replaces_the_old_run(cache, finished):
    plan = plan_run(cfg(cache, finished, num_steps=2), resume=False, overwrite=True)
    assert plan.action == "new" and "Replacing the run at step 4" in plan.report()
    result = execute(plan)
    assert result.step == 2 and [p.name for p in list_checkpoints(finished)] == ["checkpoint_000002.pt"]


def test_a_run_failing_in_its_first_step_leaves_no_folder(cache, tmp_path):
    run = tmp_path / "out" / "run"
    bad = cfg(cache, run, extra={"tiny": {"text_dim": 48}})  # model and data do not fit: fails in step 1
    with pytest.raises(RuntimeError):
        execute(plan_run(bad, resume=True))
    assert not run.exists()
    # a folder that was there before keeps what it held, and only that
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        execute(plan_run(bad, resume=True))
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_cancel_before_the_first_step_leaves_no_folder(cache, tmp_path):
    result = execute(plan_run(cfg(cache, tmp_path / "run"), resume=True), should_cancel=lambda: True)
    assert result.status == "cancelled" and result.step == 0 and result.checkpoint is None
    assert not (tmp_path / "run").exists()


def test_training_inside_inference_mode_with_inference_inputs(cache, tmp_path):
    """As a ComfyUI node: everything - model, clips, the trainer itself - made under inference mode."""
    with torch.inference_mode():
        clips = load_prepared(cache)
        model = tiny_transformer()
        assert clips[0].mean.is_inference() and next(model.parameters()).is_inference()
        trainer = Trainer(cfg(cache, tmp_path / "run", num_steps=3), clips=clips, model=model)
        branch, losses = trainer.train_step()
        result = trainer.train()
        assert result.status == "finished" and result.step == 3
        assert all(torch.isfinite(torch.tensor(h["total"])) for h in result.history)
        # the adapters learned: LoRA B matrices start at zero and moved
        assert any(float(p.abs().sum()) > 0 for n, p in triplet.lora_parameters(trainer.model) if "lora_B" in n)
        # resume and the run plan also work from inside inference mode
        resumed = Trainer.resume(tmp_path / "run", clips=clips, model=tiny_transformer())
        assert resumed.step == 3
        resumed.config.num_steps = 5
        assert resumed.train().step == 5
        plan = plan_run(cfg(cache, tmp_path / "run", num_steps=6), resume=True)
        assert execute(plan, clips=clips).step == 6
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint_000006.pt"
    assert clips[0].mean.is_inference()  # the caller's tensors are left as they were
