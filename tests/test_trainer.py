"""The shared trainer on a toy stage, one process: schedules, resume, preemption, non-finite losses,
gradient accumulation. The two-process and kill -9 tests are in test_teacher_cache.py."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fixtures import one_torch_thread

from uniremoval.config import ScheduleConfig, TeacherStage
from uniremoval.errors import UniremovalError
from uniremoval.stages.run_folder import list_checkpoints
from uniremoval.stages.trainer import Stage, Trainer, lr_factor, skip_batches


def make_cfg(tmp_path: Path, optim: dict | None = None, **train) -> TeacherStage:
    t = {"epochs": 2, "steps_per_epoch": 5, "log_every": 2, "val_every": 5, "seed": 3}
    t.update(train)
    return TeacherStage(stage="teacher", degradation="haze", output_dir=str(tmp_path), name="toy",
                        train=t, optim=optim or {"lr": 0.05}, checkpoint={"every_steps": 3, "keep_last": 2},
                        tracking={"enabled": False})


class ToyStage(Stage):
    """y = conv(x) fitted to a fixed random conv; batches a function of (epoch, index)."""

    run_name, stage, trainable = "toy", "teacher", ("net",)
    best_metric = ("val/toy/err", "min")

    def __init__(self, cfg, poison_at: int | None = None, signal_at: int | None = None, batch: int = 4):
        super().__init__(cfg)
        self.poison_at, self.signal_at, self.batch = poison_at, signal_at, batch
        self.seen: list[tuple[int, int]] = []
        g = torch.Generator().manual_seed(99)
        self.true_w = torch.randn(3, 3, 3, 3, generator=g) * 0.3

    def build_models(self):
        return {"net": nn.Conv2d(3, 3, 3, padding=1, bias=False)}

    def data(self, epoch: int, i: int, batch: int | None = None) -> dict:
        g = torch.Generator().manual_seed(epoch * 1000 + i)
        x = torch.randn(batch or self.batch, 3, 8, 8, generator=g)
        return {"input": x, "target": nn.functional.conv2d(x, self.true_w, padding=1), "idx": (epoch, i)}

    def train_batches(self, epoch, start, rank, world_size):
        n = self.cfg.train.steps_per_epoch * self.cfg.train.grad_accum
        return skip_batches((self.data(epoch, i) for i in range(n)), start)

    def training_step(self, batch, ctx):
        self.seen.append(batch["idx"])
        out = ctx.models["net"](batch["input"])
        loss = nn.functional.mse_loss(out, batch["target"])
        if self.poison_at is not None and ctx.step == self.poison_at:
            loss = loss * float("nan")
        if self.signal_at is not None and ctx.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        ctx.optimize("net", loss, {"mse": loss})
        return {"mse": loss}

    def validate(self, ctx):
        b = self.data(999, 0)
        err = nn.functional.mse_loss(ctx.unwrap("net")(b["input"]), b["target"]).item()
        s = ctx.all_sum({"err": err, "n": 1.0})
        return {"val/toy/err": s["err"] / s["n"]}


one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # 2 threads on 2 shared cores: 10x+ slower


def weights(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["weight"]


def test_lr_schedules():
    wc = ScheduleConfig(name="warmup_cosine", warmup_steps=3, min_lr=1e-6)
    f = [lr_factor(wc, s, 13, 2e-4) for s in range(14)]
    assert f[0] == pytest.approx(1 / 3) and f[2] == pytest.approx(1.0) and f[3] == pytest.approx(1.0)
    assert f[13] == pytest.approx(1e-6 / 2e-4)
    assert all(a >= b for a, b in itertools.pairwise(f[3:]))  # monotone decay after warmup
    assert lr_factor(ScheduleConfig(name="cosine"), 5, 10, 1.0) == pytest.approx(0.5)
    assert lr_factor(ScheduleConfig(), 7, 10, 1.0) == 1.0


def test_train_checkpoint_resume_equals_uninterrupted(tmp_path, capsys):
    ref_stage = ToyStage(make_cfg(tmp_path / "a"))
    res = Trainer(ref_stage.cfg, ref_stage).fit()
    assert res.status == "finished" and res.step == 10
    run = tmp_path / "a" / "toy"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000009", "step-00000010"]
    assert (run / "last.safetensors").is_file() and (run / "best.safetensors").is_file()
    ref = weights(run / "last.safetensors")
    first_val = ToyStage(make_cfg(tmp_path)).data(999, 0)
    assert res.metrics["val/toy/err"] < nn.functional.mse_loss(first_val["input"] * 0, first_val["target"]).item()

    # Stop after 4 steps (max_steps is not part of the run's identity), then resume to the end.
    part = ToyStage(make_cfg(tmp_path / "b", max_steps=4))
    Trainer(part.cfg, part).fit()
    ck = list_checkpoints(tmp_path / "b" / "toy" / "checkpoints")
    assert [p.name for p in ck] == ["step-00000003", "step-00000004"]
    # A checkpoint being written when the process died is a hidden temp folder: ignored.
    (ck[0].parent / ".step-00000005.tmp").mkdir()
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(ck[1])  # pretend the kill came before step 4 was saved: resume from 3
    rest = ToyStage(make_cfg(tmp_path / "b"))
    capsys.readouterr()
    res2 = Trainer(rest.cfg, rest).fit(resume="auto")
    assert res2.step == 10
    assert ("at step 3; reading past epoch 0's first 3 micro-batches first (decoded and skipped"
            in capsys.readouterr().err)  # the wait before the first step is said
    assert rest.seen[0] == (0, 3)  # data position: epoch 0, micro-batch 3 (steps 0-2 were seen)
    assert torch.equal(weights(tmp_path / "b" / "toy" / "last.safetensors"), ref)
    # Resuming a finished run asks for nothing: said, not silent; a max_steps past the end is named.
    capsys.readouterr()
    more = ToyStage(make_cfg(tmp_path / "b", max_steps=12))
    with pytest.warns(RuntimeWarning, match=r"train\.max_steps=12 is beyond the run's end, train\.epochs x "
                                            r"train\.steps_per_epoch = 10: it stops at step 10"):
        assert Trainer(more.cfg, more).fit(resume="auto").step == 10
    assert ("step 10 is already the run's end (train.epochs x train.steps_per_epoch = 10): nothing to train; "
            "raise train.epochs and --resume auto") in capsys.readouterr().err
    assert more.seen == [] and torch.equal(weights(tmp_path / "b" / "toy" / "last.safetensors"), ref)
    # the limit reached is the one named (it said "raise train.epochs (or train.max_steps)" whichever it was)
    capped = ToyStage(make_cfg(tmp_path / "b", max_steps=10, epochs=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # train.epochs changed: named on resume
        Trainer(capped.cfg, capped).fit(resume="auto")
    assert "(train.max_steps=10): nothing to train; raise train.max_steps and --resume auto" in \
        capsys.readouterr().err

    # --resume PATH: an explicit checkpoint folder; a folder without training state is refused.
    again = ToyStage(make_cfg(tmp_path / "c"))
    res3 = Trainer(again.cfg, again).fit(resume=str(run / "checkpoints" / "step-00000009"))
    assert again.seen == [(1, 4)] and res3.step == 10  # epoch 1, its last micro-batch
    assert torch.equal(weights(tmp_path / "c" / "toy" / "last.safetensors"), ref)
    with pytest.raises(UniremovalError, match="no state.pt"):
        bad = ToyStage(make_cfg(tmp_path / "d"))
        Trainer(bad.cfg, bad).fit(resume=str(tmp_path))
    with pytest.raises(UniremovalError, match=r"resume checkpoint \S+step-00000099 does not exist; give a "):
        bad = ToyStage(make_cfg(tmp_path / "d2"))
        Trainer(bad.cfg, bad).fit(resume=str(run / "checkpoints" / "step-00000099"))
    # A checkpoint written under DeepSpeed (optimiser state in deepspeed/, none in state.pt) resumed
    # without it: a named refusal, not a KeyError on the model name.
    ds_ck = tmp_path / "ds" / "step-00000009"
    __import__("shutil").copytree(run / "checkpoints" / "step-00000009", ds_ck)
    state = torch.load(ds_ck / "state.pt", weights_only=True)
    torch.save({**state, "optimizers": {}}, ds_ck / "state.pt")
    (ds_ck / "deepspeed").mkdir()
    with pytest.raises(UniremovalError, match=r"written under DeepSpeed, and this run is launched without it"):
        bad = ToyStage(make_cfg(tmp_path / "e"))
        Trainer(bad.cfg, bad).fit(resume=str(ds_ck))



def test_deepspeed_resume_refuses_another_zero_stage_or_process_count(tmp_path, monkeypatch):
    """DeepSpeed partitions its optimiser state by ZeRO stage and process count: a checkpoint resumed
    under another stage or --num_processes is refused by name (it failed inside load_state with a bare
    AssertionError, or ZeRORuntimeException). The trainer's DeepSpeed switches are faked: the refusal
    comes before anything DeepSpeed loads (the two-process runs are tests/test_deepspeed.py's)."""
    import shutil

    part = ToyStage(make_cfg(tmp_path, max_steps=3))
    Trainer(part.cfg, part).fit()
    ck = tmp_path / "toy" / "checkpoints" / "step-00000003"
    state = torch.load(ck / "state.pt", weights_only=True)
    assert state["zero_stage"] == 0 and state["world_size"] == 1

    def ds_checkpoint(name, **saved):
        folder = tmp_path / name / "step-00000003"
        shutil.copytree(ck, folder)
        torch.save({**state, "optimizers": {}, **saved}, folder / "state.pt")
        (folder / "deepspeed" / "pytorch_model").mkdir(parents=True)
        return folder

    def resume_under(stage, folder):
        monkeypatch.setattr(Trainer, "deepspeed", property(lambda self: True))
        monkeypatch.setattr(Trainer, "zero_stage", property(lambda self: stage))
        run = ToyStage(make_cfg(tmp_path / f"resume-{folder.parent.name}"))
        with pytest.raises(UniremovalError) as err:
            Trainer(run.cfg, run).load(str(folder))
        return str(err.value)

    msg = resume_under(3, ds_checkpoint("z2", zero_stage=2))
    assert "written under DeepSpeed with ZeRO stage 2, this run 3" in msg
    assert "model.init=" in msg and msg.endswith("step-00000003/net.safetensors")
    msg = resume_under(2, ds_checkpoint("z2n2", zero_stage=2, world_size=2))
    assert "with 2 processes, this run 1" in msg and "--num_processes 2" in msg
    # written before checkpoints kept the stage: ZeRO-3's per-rank model files tell it apart
    old = ds_checkpoint("z3old")
    old_state = torch.load(old / "state.pt", weights_only=True)
    del old_state["zero_stage"]
    torch.save(old_state, old / "state.pt")
    (old / "deepspeed" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt").touch()
    assert "ZeRO stage 3, this run 2" in resume_under(2, old)


def test_resume_names_changed_settings_and_refuses_another_model(tmp_path):
    """A resumed run may change its length or logging (each change named in one warning), not what the
    checkpoint's weights are: another degradation type, architecture or stage is refused by name, and
    the checkpoint's own config.yaml resumes it with no warning."""
    from mlflow.tracking import MlflowClient

    from uniremoval.config import TrackingConfig, load_config

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def tracked(cfg):
        return cfg.model_copy(update={"tracking": TrackingConfig(uri=store, experiment="resume")})

    part = ToyStage(tracked(make_cfg(tmp_path, max_steps=4)))
    run_id = Trainer(part.cfg, part).fit().run_id
    # the batches follow the process count, which the config does not hold: the run records it
    assert MlflowClient(store).get_run(run_id).data.tags["world_size"] == "1"
    ck = tmp_path / "toy" / "checkpoints" / "step-00000004"
    saved = load_config(ck / "config.yaml")
    assert saved == part.cfg

    rain = ToyStage(make_cfg(tmp_path).model_copy(update={"degradation": "rain"}))
    with pytest.raises(UniremovalError, match=r"trained with another degradation: 'haze' -> 'rain'.*"
                                              r"step-00000004/config.yaml.*model.init=.*step-00000004/net"):
        Trainer(rain.cfg, rain).fit(resume="auto")
    assert rain.seen == []
    wider = ToyStage(make_cfg(tmp_path).model_copy(update={"model": part.cfg.model.model_copy(
        update={"preset": "derain"})}))
    with pytest.raises(UniremovalError, match=r"model.preset: 'deblur' -> 'derain'"):
        Trainer(wider.cfg, wider).fit(resume=str(ck))

    longer = ToyStage(tracked(make_cfg(tmp_path, log_every=3, max_steps=6)))
    with pytest.warns(RuntimeWarning, match=r"with 1 changed setting\(s\): train.log_every: 2 -> 3$"):
        res = Trainer(longer.cfg, longer).fit(resume="auto")
    assert res.step == 6 and longer.seen[0] == (0, 4)
    # the MLflow run (the same one) keeps its params and says what this resume changed
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert res.run_id == run_id and run.data.params["train.log_every"] == "2"
    assert run.data.tags["resumed_changes"] == "train.log_every: 2 -> 3"
    assert {f.path for f in client.list_artifacts(run_id)} >= {"config.yaml", "config-resumed-step00000004.yaml"}
    saved = load_config(tmp_path / "toy" / "checkpoints" / "step-00000006" / "config.yaml")
    assert saved.train.log_every == 3  # each checkpoint keeps the config that wrote it
    same = ToyStage(saved.model_copy(update={"train": saved.train.model_copy(update={"max_steps": 8})}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert Trainer(same.cfg, same).fit(resume="auto").step == 8


def test_a_resume_says_when_the_batches_change(tmp_path, capsys):
    """The batch sequence follows the process count and data.num_workers (each rank and loader worker
    streams its own share of the shards): a resume that changes either says the batches are no longer
    an uninterrupted run's (0 and 1 workers read alike: no such note), and a changed process count
    goes into the run's resumed_changes tag (its world_size tag: test_resume_names_changed_settings...)."""

    def cfg(workers: int, max_steps: int):
        c = make_cfg(tmp_path, max_steps=max_steps)
        return c.model_copy(update={"data": c.data.model_copy(update={"num_workers": workers})})

    first = ToyStage(cfg(0, 3))
    Trainer(first.cfg, first).fit()
    same = ToyStage(cfg(1, 4))
    with pytest.warns(RuntimeWarning, match=r"data.num_workers: 0 -> 1$"):
        Trainer(same.cfg, same).fit(resume="auto")
    more = ToyStage(cfg(2, 5))
    with pytest.warns(RuntimeWarning, match=r"data.num_workers: 1 -> 2\. data.num_workers decides which samples"):
        Trainer(more.cfg, more).fit(resume="auto")
    # a checkpoint written by two processes, resumed on one
    ck = tmp_path / "toy" / "checkpoints" / "step-00000005"
    state = torch.load(ck / "state.pt", weights_only=True)
    torch.save({**state, "world_size": 2}, ck / "state.pt")
    fewer = ToyStage(cfg(2, 6))
    trainer = Trainer(fewer.cfg, fewer)
    with pytest.warns(RuntimeWarning, match=r"on 1 processes \(saved on 2\): RNG streams start fresh, and from here "
                                            r"on the batches are not those of an uninterrupted run on 2"):
        trainer.fit(resume="auto")
    assert trainer.resumed_changes == ["processes: 2 -> 1"]
    # train.grad_accum: the epoch's position is counted in the new micro-batches per step, so samples are
    # skipped; the resume line said the run went on "with the batches an uninterrupted one would see"
    capsys.readouterr()
    c = cfg(2, 7)
    accum = ToyStage(c.model_copy(update={"train": c.train.model_copy(update={"grad_accum": 2})}))
    with pytest.warns(RuntimeWarning, match=r"train.grad_accum: 1 -> 2\. train.grad_accum sets the micro-batches a "
                                            r"step reads: .* so samples are skipped relative to it"):
        Trainer(accum.cfg, accum).fit(resume="auto")
    err = capsys.readouterr().err
    assert "at step 6; reading past epoch 1's first 2 micro-batches first (decoded and skipped: the changes " \
           "warned about mean the batches from here on are not an uninterrupted run's)" in err, err
    # unchanged settings: the claim stands
    again = ToyStage(accum.cfg.model_copy(update={"train": accum.cfg.train.model_copy(update={"max_steps": 8})}))
    Trainer(again.cfg, again).fit(resume="auto")
    assert "micro-batches first (decoded and skipped: the run goes on with the batches an uninterrupted one would " \
           "see)" in capsys.readouterr().err
    # a data setting that makes no batch (pinned memory) is a change, not a change of batches
    c = again.cfg.model_copy(update={"train": again.cfg.train.model_copy(update={"max_steps": 9})})
    pinned = ToyStage(c.model_copy(update={"data": c.data.model_copy(update={"pin_memory": False})}))
    with pytest.warns(RuntimeWarning, match=r"data.pin_memory: True -> False$"):
        Trainer(pinned.cfg, pinned).fit(resume="auto")
    assert "(decoded and skipped: the run goes on with the batches an uninterrupted one would see)" in \
        capsys.readouterr().err


def test_a_resume_names_weights_replaced_under_the_same_path(tmp_path):
    """A stage's other weights (KT's teachers) are recorded in each checkpoint by sha256: a resume
    after one was replaced under the same path (the config is unchanged) names it, rather than going
    on silently with another teacher; unchanged ones resume without a word."""

    class WithTeacher(ToyStage):
        teacher = "a" * 64

        def weights_identity(self):
            return {"teachers.checkpoints.haze": self.teacher}

    first = WithTeacher(make_cfg(tmp_path, max_steps=3))
    Trainer(first.cfg, first).fit()
    same = WithTeacher(make_cfg(tmp_path, max_steps=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Trainer(same.cfg, same).fit(resume="auto")
    other = WithTeacher(make_cfg(tmp_path, max_steps=5))
    other.teacher = "b" * 64
    trainer = Trainer(other.cfg, other)
    with pytest.warns(RuntimeWarning, match=r"step-00000004: teachers.checkpoints.haze: weights sha256 aaaaaaaaaaaa "
                                            r"-> bbbbbbbbbbbb\. These are not the weights the checkpoint was trained"):
        trainer.fit(resume="auto")
    assert trainer.resumed_changes == ["teachers.checkpoints.haze: weights sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb"]


def test_a_resume_of_a_checkpoint_without_the_weights_record_says_it_cannot_check_them(tmp_path):
    """A checkpoint of a uniremoval older than the weights record (no weights_sha256 in state.pt) was
    resumed without a word even when a teacher had been replaced under the same path since: the resume
    now says the teachers cannot be checked, and names those whose file was modified after the
    checkpoint was written (also in resumed_changes)."""
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"teacher weights")
    old = os.stat(teacher).st_mtime - 1000
    os.utime(teacher, (old, old))

    class WithTeacher(ToyStage):
        def weights_identity(self):
            return {"model.init": "a" * 64}

    def cfg(max_steps: int):
        c = make_cfg(tmp_path, max_steps=max_steps)
        return c.model_copy(update={"model": c.model.model_copy(update={"init": str(teacher)})})

    def drop_record(step: int) -> None:  # what an older version wrote
        state_file = tmp_path / "toy" / "checkpoints" / f"step-{step:08d}" / "state.pt"
        state = torch.load(state_file, weights_only=True)
        del state["weights_sha256"]
        torch.save(state, state_file)

    first = WithTeacher(cfg(3))
    Trainer(first.cfg, first).fit()
    drop_record(3)
    same = WithTeacher(cfg(4))
    with pytest.warns(RuntimeWarning, match=r"step-00000003: it was written by an older uniremoval that did not "
                                            r"record the sha256 of model.init, so whether they are still the weights "
                                            r"it was trained with cannot be checked \(none was modified after it"):
        Trainer(same.cfg, same).fit(resume="auto")
    drop_record(4)
    new = os.stat(teacher).st_mtime + 2000  # a retrained teacher put in place after the checkpoint
    os.utime(teacher, (new, new))
    later = WithTeacher(cfg(5))
    trainer = Trainer(later.cfg, later)
    with pytest.warns(RuntimeWarning, match=rf"cannot be checked; modified after it was written: model.init "
                                            rf"\({re.escape(str(teacher))}\)\. If that is another teacher"):
        trainer.fit(resume="auto")
    assert trainer.resumed_changes == [f"modified since the checkpoint: model.init ({teacher})"]


def test_grad_accumulation_matches_large_batch(tmp_path):
    # Adam divides by sqrt(v), so a gradient off by a constant factor (a missing 1/grad_accum)
    # would move the weights alike; eps far above sqrt(v) makes the step proportional to the
    # gradient, so that factor shows.
    optim = {"lr": 0.05, "eps": 10.0}
    big = ToyStage(make_cfg(tmp_path / "big", optim, epochs=1, steps_per_epoch=3), batch=8)
    big.data = lambda e, i, b=None, s=big: ToyStage.data(s, e, i, 8)  # type: ignore[method-assign]
    Trainer(big.cfg, big).fit()

    class Halves(ToyStage):
        def train_batches(self, epoch, start, rank, world_size):
            def gen():
                for i in range(self.cfg.train.steps_per_epoch):
                    full = ToyStage.data(self, epoch, i, 8)
                    for h in (slice(0, 4), slice(4, 8)):
                        yield {"input": full["input"][h], "target": full["target"][h], "idx": (epoch, i)}
            return skip_batches(gen(), start)

    acc = Halves(make_cfg(tmp_path / "acc", optim, epochs=1, steps_per_epoch=3, grad_accum=2))
    Trainer(acc.cfg, acc).fit()
    assert len(acc.seen) == 6
    torch.testing.assert_close(weights(tmp_path / "acc/toy/last.safetensors"),
                               weights(tmp_path / "big/toy/last.safetensors"), rtol=1e-5, atol=1e-6)


class PoisonFirstMicro(ToyStage):
    """NaN in the first micro-batch of step 2 (its third call, with grad_accum=2)."""

    calls = 0

    def training_step(self, batch, ctx):
        self.calls += 1
        self.poison_at = ctx.step if self.calls == 3 else None
        return super().training_step(batch, ctx)


def test_nonfinite_micro_batch_drops_its_whole_update(tmp_path):
    # grad_accum=2: the FIRST micro-batch of step 2 is NaN. The update of that window must be
    # dropped whole; stepping with the second micro-batch's half gradient would move the weights.
    one = ToyStage(make_cfg(tmp_path / "one", max_steps=1, grad_accum=2))
    Trainer(one.cfg, one).fit()
    st = PoisonFirstMicro(make_cfg(tmp_path / "two", max_steps=2, grad_accum=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = Trainer(st.cfg, st).fit()
    assert res.step == 2 and res.nonfinite_skipped == 1 and len(st.seen) == 4
    torch.testing.assert_close(weights(tmp_path / "two/toy/last.safetensors"),
                               weights(tmp_path / "one/toy/last.safetensors"), rtol=0, atol=0)


def test_nonfinite_skip_then_stop(tmp_path):
    st = ToyStage(make_cfg(tmp_path / "s", max_steps=4), poison_at=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = Trainer(st.cfg, st).fit()
    assert res.nonfinite_skipped == 1 and res.step == 4
    msgs = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert msgs and "step 2" in msgs[0] and "mse=nan" in msgs[0]
    assert torch.isfinite(weights(tmp_path / "s/toy/last.safetensors")).all()

    st2 = ToyStage(make_cfg(tmp_path / "t", max_steps=4, nonfinite="stop"), poison_at=2)
    with pytest.raises(UniremovalError, match=r"non-finite loss at step 3.*mse=nan"):
        Trainer(st2.cfg, st2).fit()
    st3 = ToyStage(make_cfg(tmp_path / "u", max_steps=4, max_nonfinite=0), poison_at=0)
    with pytest.raises(UniremovalError, match="max_nonfinite=0"):
        Trainer(st3.cfg, st3).fit()


def test_temporaries_of_a_killed_job_are_removed_on_restart(tmp_path, capsys):
    # kill -9 during a preemption checkpoint (a step no periodic save reuses) or during the export
    # of last/best leaves hidden temporaries no later write overwrites: one model-sized orphan per
    # kill, over a job's many requeues. The next start removes them, and nothing else.
    part = ToyStage(make_cfg(tmp_path, max_steps=3))
    Trainer(part.cfg, part).fit()
    run = tmp_path / "toy"
    stale = [run / "checkpoints" / ".step-00000004.tmp", run / ".last.safetensors.k2x9_abc.tmp",
             run / ".best.json.q1w2e3r4.tmp"]
    stale[0].mkdir()
    (stale[0] / "state.pt").write_bytes(b"x" * 1000)
    for f in stale[1:]:
        f.write_bytes(b"x")
    keep = [run / ".mlflow-spool.jsonl.abc123.tmp", run / "notes.tmp", run / ".other.safetensors.abc.tmp"]
    for f in keep:
        f.write_bytes(b"k")
    rest = ToyStage(make_cfg(tmp_path))
    res = Trainer(rest.cfg, rest).fit(resume="auto")
    assert res.step == 10 and rest.seen[0] == (0, 3)
    assert not any(f.exists() for f in stale), [f.name for f in stale if f.exists()]
    assert all(f.exists() for f in keep)
    assert "removed 3 temporary" in capsys.readouterr().err
    assert not list((run / "checkpoints").glob(".*"))


def test_sigusr1_checkpoints_and_stops(tmp_path, capsys):
    # Stops at step 4: checkpoint.every_steps is 3, so only the signal writes this checkpoint.
    st = ToyStage(make_cfg(tmp_path), signal_at=3)
    res = Trainer(st.cfg, st).fit()
    assert res.status == "preempted" and res.step == 4
    assert res.checkpoint is not None and res.checkpoint.name == "step-00000004"
    assert {p.name for p in res.checkpoint.iterdir()} >= {"state.pt", "net.safetensors"}
    assert "preempted: checkpoint saved at step 4" in capsys.readouterr().err
    assert not (tmp_path / "toy" / "last.safetensors").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


def test_a_stop_at_a_validation_step_checkpoints_first_and_the_resume_validates(tmp_path, capsys):
    """A scheduler's stop (a deadline: slurm_paper.sh leaves 100 s) came at a step due for validation and
    the validation ran first: a long one could be killed before the checkpoint was written. The stop is
    answered first now, and the resumed run validates that step before training on."""

    class Counting(ToyStage):
        def __init__(self, cfg, **kw):
            super().__init__(cfg, **kw)
            self.val_steps: list[int] = []

        def validate(self, ctx):
            self.val_steps.append(ctx.step)
            return super().validate(ctx)

    first = Counting(make_cfg(tmp_path), signal_at=4)  # the stop arrives in step 5, which validation is due at
    res = Trainer(first.cfg, first).fit()
    assert res.status == "preempted" and res.step == 5 and first.val_steps == []
    assert torch.load(res.checkpoint / "state.pt", weights_only=True)["val_pending"] is True
    rest = Counting(make_cfg(tmp_path))
    res2 = Trainer(rest.cfg, rest).fit(resume="auto")
    assert res2.status == "finished" and rest.val_steps == [5, 10]  # step 5's first, then as planned
    ref = Counting(make_cfg(tmp_path / "ref"))
    Trainer(ref.cfg, ref).fit()
    assert ref.val_steps == [5, 10] and torch.equal(weights(tmp_path / "toy" / "best.safetensors"),
                                                    weights(tmp_path / "ref" / "toy" / "best.safetensors"))
    # A stop at the last step: no checkpoint follows the resumed run's validation, so its checkpoint's
    # state.pt is told (a later resume with more epochs validated step 10 again: val steps 10, 10, 15)
    last = Counting(make_cfg(tmp_path / "last"), signal_at=9)
    assert Trainer(last.cfg, last).fit().step == 10 and last.val_steps == [5]
    ck = tmp_path / "last" / "toy" / "checkpoints" / "step-00000010"
    written = (ck / "state.pt").stat().st_mtime_ns
    again = Counting(make_cfg(tmp_path / "last"))
    trainer = Trainer(again.cfg, again)
    assert trainer.fit(resume="auto").status == "finished" and again.val_steps == [10]
    state = torch.load(ck / "state.pt", weights_only=True)
    assert state["val_pending"] is False and state["best_value"] == trainer.best_value is not None
    assert (ck / "state.pt").stat().st_mtime_ns == written  # its time stays the checkpoint's
    longer = Counting(make_cfg(tmp_path / "last", epochs=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # train.epochs changed: named on resume
        Trainer(longer.cfg, longer).fit(resume="auto")
    assert longer.val_steps == [15]


class ServerComesUpStage(ToyStage):
    """ToyStage whose MLflow server becomes reachable (a proxy starts listening) at `up_at`."""

    def __init__(self, cfg, upstream: int, port: int, up_at: int):
        super().__init__(cfg)
        self.upstream, self.port, self.up_at = upstream, port, up_at
        self.proxy = None

    def training_step(self, batch, ctx):
        if ctx.step == self.up_at and self.proxy is None:
            from _fixtures import GatedProxy

            self.proxy = GatedProxy(self.upstream, port=self.port)
        return super().training_step(batch, ctx)


@pytest.mark.slow
def test_mlflow_down_at_start_the_run_created_later_is_the_one_reported(tmp_path, monkeypatch):
    """The server is unreachable when training starts: the run exists only once the spool is replayed
    (here at the end); the trainer reports that run, which holds every logged step in order."""
    from _fixtures import free_port, start_mlflow_server, stop_server
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    server_port, proxy_port = free_port(), free_port()
    proc = start_mlflow_server(tmp_path, server_port)
    st = None
    try:
        cfg = make_cfg(tmp_path / "run").model_copy(update={"tracking": make_cfg(tmp_path).tracking.model_copy(
            update={"enabled": True, "uri": f"http://127.0.0.1:{proxy_port}"})})
        st = ServerComesUpStage(cfg, server_port, proxy_port, up_at=8)
        with pytest.warns(RuntimeWarning, match="unreachable"):
            res = Trainer(cfg, st).fit()
        assert res.status == "finished" and res.run_id is not None
        client = MlflowClient(f"http://127.0.0.1:{server_port}")
        run = client.get_run(res.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["stage"] == "teacher"
        assert [m.step for m in client.get_metric_history(res.run_id, "train/mse")] == [2, 4, 6, 8, 10]
        assert [m.step for m in client.get_metric_history(res.run_id, "val/toy/err")] == [5, 10]
        # epochs completed at each log, 5 steps an epoch (the end of epoch 0 is 1.0, not the next index)
        epochs = [m.value for m in client.get_metric_history(res.run_id, "train/epoch")]
        assert epochs == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])
        assert not (tmp_path / "run" / "toy" / "mlflow-spool.jsonl").exists()
    finally:
        if st is not None and st.proxy is not None:
            st.proxy.close()
        stop_server(proc)


def test_a_fresh_run_never_overwrites_another_and_an_unwritable_folder_stops_at_once(tmp_path):
    """Without --resume, a run folder that already holds weights is refused before anything is
    trained, and the old run's files are untouched; a folder that cannot be written is refused
    before the first step rather than at the first checkpoint."""
    import hashlib

    first = ToyStage(make_cfg(tmp_path))
    Trainer(first.cfg, first).fit()
    run = tmp_path / "toy"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}
    other = ToyStage(make_cfg(tmp_path, optim={"lr": 0.01}))
    with pytest.raises(UniremovalError, match=r"toy already holds a run \(checkpoints up to step-00000010\).*"
                                              r"--resume auto.*another output_dir or name"):
        Trainer(other.cfg, other).fit()
    assert other.seen == []
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()} == before
    # exports alone (checkpoints pruned or copied elsewhere) count too
    import shutil

    shutil.rmtree(run / "checkpoints")
    for resume in (None, "auto"):  # nothing to continue: --resume auto must not overwrite them either
        with pytest.raises(UniremovalError, match=r"holds the weights of an earlier run \(best.safetensors.*\) "
                                                  r"but no checkpoint to continue it from; give this run another"):
            Trainer(other.cfg, other).fit(resume=resume)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.glob("*.*"))} == {
        p: h for p, h in before.items() if p.parent == run and p.suffix != ".lock"}
    # a second job on the same run folder while the first runs (here: the lock the first would hold)
    from uniremoval.io import folder_lock

    again = ToyStage(make_cfg(tmp_path))
    with folder_lock(run, ".lock", "the run 'toy'"), \
            pytest.raises(UniremovalError, match=r"toy is in use: pid \d+ on .* is writing the run 'toy' there"):
        Trainer(again.cfg, again).fit(resume="auto")
    assert again.seen == []
    # refusals released the lock: the run goes on (checkpoints and weights deleted: from step 0)
    for exported in [*run.glob("*.safetensors"), *run.glob("*.json")]:
        exported.unlink()
    res = Trainer(again.cfg, again).fit(resume="auto")
    assert res.status == "finished" and res.step == 10 and len(again.seen) == 10
    (tmp_path / "file").write_text("x")
    blocked = ToyStage(make_cfg(tmp_path / "file" / "sub"))
    with pytest.raises(UniremovalError, match=r"run folder .*file/sub/toy: .*file is a file, so no folder can be made there; set output_dir"):
        Trainer(blocked.cfg, blocked).fit()
    assert blocked.seen == []


class ScriptedVal(ToyStage):
    """ToyStage whose validation metric is scripted per step; `mode` picks the better direction."""

    def __init__(self, cfg, values: dict[int, float], mode: str):
        super().__init__(cfg)
        self.values, self.best_metric = values, ("val/toy/err", mode)

    def validate(self, ctx):
        # steps off the script (the validation when max_steps stops a run) score worst of all
        return {"val/toy/err": self.values.get(ctx.step, 10.0 if self.best_metric[1] == "min" else 0.0)}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_weights_are_those_of_the_best_validation_and_survive_a_resume(tmp_path, mode):
    """best.safetensors holds the weights of the step with the best metric (lowest for "min", highest
    for "max"), not the latest; a resume after the best step keeps comparing against the saved best."""
    import json

    values = {3: 3.0, 6: 1.0, 9: 2.0} if mode == "min" else {3: 1.0, 6: 3.0, 9: 2.0}
    opts = {"epochs": 1, "steps_per_epoch": 9, "val_every": 3}
    st = ScriptedVal(make_cfg(tmp_path / "a", **opts).model_copy(
        update={"checkpoint": make_cfg(tmp_path).checkpoint.model_copy(update={"keep_last": 5})}), values, mode)
    Trainer(st.cfg, st).fit()
    run = tmp_path / "a" / "toy"
    at6 = weights(run / "checkpoints" / "step-00000006" / "net.safetensors")
    assert not torch.equal(at6, weights(run / "last.safetensors"))  # the weights moved after step 6
    assert torch.equal(weights(run / "best.safetensors"), at6)
    meta = json.loads((run / "best.json").read_text())
    assert meta["step"] == 6 and meta["best_value"] == 3.0 - 2.0 * (mode == "min")
    # Stopped at 7 (after the best step), resumed: step 9's value is worse than step 6's, so best stays.
    part = ScriptedVal(make_cfg(tmp_path / "b", max_steps=7, **opts), values, mode)
    Trainer(part.cfg, part).fit()
    assert torch.equal(weights(tmp_path / "b" / "toy" / "best.safetensors"), at6)
    rest = ScriptedVal(make_cfg(tmp_path / "b", **opts), values, mode)
    assert Trainer(rest.cfg, rest).fit(resume="auto").step == 9
    assert torch.equal(weights(tmp_path / "b" / "toy" / "best.safetensors"), at6)
    assert json.loads((tmp_path / "b" / "toy" / "best.json").read_text())["step"] == 6


class NoisyStage(ToyStage):
    """ToyStage whose step draws from the global torch, numpy and python RNGs (augmentation, dropout)."""

    def training_step(self, batch, ctx):
        import random

        import numpy as np

        scale = 1.0 + 0.5 * random.random() + 0.5 * float(np.random.rand())
        batch = dict(batch, input=batch["input"] * scale + 0.3 * torch.randn_like(batch["input"]))
        return super().training_step(batch, ctx)


def test_resume_restores_the_random_streams(tmp_path):
    """A stage drawing random numbers in its steps: resumed at step 4, the run equals the uninterrupted
    one only if the checkpoint's RNG states (torch, numpy, python) are restored, not re-seeded."""
    ref = NoisyStage(make_cfg(tmp_path / "a"))
    Trainer(ref.cfg, ref).fit()
    part = NoisyStage(make_cfg(tmp_path / "b", max_steps=4))
    Trainer(part.cfg, part).fit()
    rest = NoisyStage(make_cfg(tmp_path / "b"))
    assert Trainer(rest.cfg, rest).fit(resume="auto").step == 10
    assert torch.equal(weights(tmp_path / "b" / "toy" / "last.safetensors"),
                       weights(tmp_path / "a" / "toy" / "last.safetensors"))


def test_the_mlflow_run_says_how_training_ended(tmp_path):
    """Ctrl-C marks the run KILLED (stopped by hand; `--resume auto` continues it), an error FAILED:
    never RUNNING forever. A failed run says why in its `error` tag (it was only on the job's stderr)."""
    from mlflow.tracking import MlflowClient

    from uniremoval.config import TrackingConfig

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    class Stopping(ToyStage):
        def __init__(self, cfg, stop: BaseException):
            super().__init__(cfg)
            self.stop = stop

        def training_step(self, batch, ctx):
            if ctx.step == 2:
                raise self.stop
            return super().training_step(batch, ctx)

    statuses, errors = {}, {}
    for name, stop in (("ctrl-c", KeyboardInterrupt()), ("error", RuntimeError("boom\nsecond line"))):
        cfg = make_cfg(tmp_path / name).model_copy(update={"tracking": TrackingConfig(uri=store, experiment=name)})
        st = Stopping(cfg, stop)
        with pytest.raises(type(stop)):
            Trainer(st.cfg, st).fit()
        client = MlflowClient(store)
        (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        statuses[name], errors[name] = run.info.status, run.data.tags.get("error")
    assert statuses == {"ctrl-c": "KILLED", "error": "FAILED"}
    assert errors == {"ctrl-c": None, "error": "RuntimeError: boom"}


def test_a_finished_run_keeps_its_weights_in_mlflow(tmp_path):
    """tracking.log_weights (default): the run's weights/ holds last and best, byte for byte the
    exported files; off, they stay on disk only."""
    from mlflow.tracking import MlflowClient

    from uniremoval.config import TrackingConfig

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = {}
    for on in (True, False):
        cfg = make_cfg(tmp_path / str(on), max_steps=5).model_copy(update={"tracking": TrackingConfig(
            uri=store, experiment="w", log_weights=on)})
        st = ToyStage(cfg)
        ids[on] = Trainer(st.cfg, st).fit().run_id
    client = MlflowClient(store)
    listed = sorted(f.path for f in client.list_artifacts(ids[True], "weights"))
    assert listed == ["weights/best.json", "weights/best.safetensors", "weights/last.json", "weights/last.safetensors"]
    got = Path(client.download_artifacts(ids[True], "weights/last.safetensors", str(tmp_path / "dl")))
    assert got.read_bytes() == (tmp_path / "True" / "toy" / "last.safetensors").read_bytes()
    assert client.list_artifacts(ids[False], "weights") == []


def test_the_loop_reads_the_device_once_per_step(tmp_path, monkeypatch):
    """A host read of a device tensor waits for the GPU to drain: with an optimiser that cannot skip
    an update on a device flag (foreach Adam, the CPU default) the trainer does one per update (its
    non-finite check of every term at once) and keeps the logged running sums on the device, reading
    them at log and checkpoint steps only. bench/gpu.py's ours_trainer_host_check times exactly this."""
    import math

    reads: list[str] = []
    trainer_file = Trainer.__init__.__code__.co_filename

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == trainer_file:
                reads.append(name)
            return real(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    class Counted(ToyStage):
        def training_step(self, batch, ctx):
            per_step.append(len(reads))
            return super().training_step(batch, ctx)

    per_step: list[int] = []
    cfg = make_cfg(tmp_path, log_every=4, val_every=100)
    res = Trainer(cfg, Counted(cfg)).fit()
    assert res.status == "finished" and res.step == 10
    deltas = [b - a for a, b in itertools.pairwise(per_step)]  # reads of steps 1..9 (the 10th ends the run)
    logged = {4, 8}  # steps that end with a log: one more read (the means, all terms at once)
    saved = {3, 6, 9}  # and with a checkpoint (which copies the weights off the device anyway): the log window
    assert deltas == [1 + (s in logged) + (s in saved) for s in range(1, 10)], deltas
    logged_mse = res.metrics["train/mse"]
    assert math.isfinite(logged_mse) and logged_mse > 0


def test_model_compile_compiles_the_trainable_and_the_listed_frozen_models(tmp_path, monkeypatch, capsys):
    """model.compile: the trainable models and the stage's `compiled_frozen` ones (VGG-19 in KT/DA)
    go through fast.compile_module in place, in model.compile_mode; other frozen models stay eager.
    A CUDA-graph mode marks every micro-batch as a new graph iteration. The run still trains."""
    from uniremoval.stages import fast

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # compiling sets it: restored after the test
    compiled: list[tuple[str, str | None]] = []
    real = fast.compile_module

    def record(module, cache_dir=None, mode=None, **kw):
        compiled.append((next(n for n, m in built.items() if m is module), mode))
        return real(module, cache_dir, backend="eager")  # dynamo traces; no code generated on this CPU

    monkeypatch.setattr(fast, "compile_module", record)
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    class WithFrozen(ToyStage):
        compiled_frozen = ("features",)

        def build_models(self):
            built.update(super().build_models(), features=nn.Identity(), teacher=nn.Identity())
            return dict(built)

    built: dict[str, nn.Module] = {}
    base = make_cfg(tmp_path, grad_accum=2)
    cfg = base.model_copy(update={"model": base.model.model_copy(update={"compile": True,
                                                                        "compile_mode": "reduce-overhead"})})
    res = Trainer(cfg, WithFrozen(cfg)).fit()
    assert sorted(compiled) == [("features", "reduce-overhead"), ("net", "reduce-overhead")]
    err = capsys.readouterr().err  # the silent minutes of the first step are announced
    assert "model.compile: net, features compile at the first step(s) (mode reduce-overhead;" in err
    assert str((tmp_path / "toy" / "compile_cache").resolve()) in err
    assert len(marks) == 10 * 2  # 10 updates of 2 micro-batches
    assert res.status == "finished" and res.metrics["val/toy/err"] < 1.0


class CtrlC(ToyStage):
    """ToyStage that presses Ctrl-C (SIGINT to itself) `times` times during step `at`."""

    def __init__(self, cfg, at: int, times: int = 1):
        super().__init__(cfg)
        self.at, self.times = at, times

    def training_step(self, batch, ctx):
        if ctx.step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
        return super().training_step(batch, ctx)


def test_ctrl_c_writes_a_checkpoint_after_the_step_and_a_second_one_stops_at_once(tmp_path, capfd):
    """One Ctrl-C is a stop at the step's end with a checkpoint (exit 130, not the scheduler's 75:
    nothing should requeue it); the steps since the last periodic checkpoint are kept."""
    st = CtrlC(make_cfg(tmp_path), at=3)
    res = Trainer(st.cfg, st).fit()
    assert (res.status, res.step, res.stop_signal, res.exit_code) == ("preempted", 4, signal.SIGINT, 130)
    assert res.checkpoint is not None and res.checkpoint.name == "step-00000004"  # every_steps is 3
    err = capfd.readouterr().err
    assert "Ctrl-C: a checkpoint is written when the current step ends, then the run stops" in err
    assert "interrupted: checkpoint saved at step 4" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    again = ToyStage(make_cfg(tmp_path))
    assert Trainer(again.cfg, again).fit(resume="auto").step == 10 and again.seen[0] == (0, 4)

    twice = CtrlC(make_cfg(tmp_path / "b"), at=3, times=2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(twice.cfg, twice).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "b/toy/checkpoints")] == ["step-00000003"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_non_finite_validation_is_never_the_best(tmp_path):
    """A model whose output went NaN scores PSNR NaN; one image restored exactly makes the mean PSNR
    inf, and as "best" no later validation could replace it. Neither is the best; the warning says
    which (an inf was blamed on a non-finite output, which scores NaN)."""
    import json

    st = ScriptedVal(make_cfg(tmp_path), {5: float("inf"), 10: 0.5}, "max")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(st.cfg, st).fit()
    # not a PSNR (DA's best is val/mean/<NR-IQA metric>): the PSNR explanation would not fit
    assert any("val/toy/err=inf is not finite (one image scored inf makes the mean inf"
               in str(w.message) for w in caught)
    assert not any("PSNR" in str(w.message) for w in caught)
    assert not any("output is not finite" in str(w.message) for w in caught)
    best = json.loads((tmp_path / "toy/best.json").read_text())
    assert (best["step"], best["best_value"]) == (10, 0.5)


def test_an_inf_mean_psnr_is_explained_as_one_exact_image(tmp_path):
    class PsnrVal(ScriptedVal):
        def __init__(self, cfg, values, mode):
            super().__init__(cfg, values, mode)
            self.best_metric = ("val/toy/psnr", mode)

        def validate(self, ctx):
            return {"val/toy/psnr": self.values.get(ctx.step, 0.0)}

    st = PsnrVal(make_cfg(tmp_path), {5: float("inf")}, "max")
    with pytest.warns(RuntimeWarning, match=r"val/toy/psnr=inf is not finite \(one image restored exactly makes a "
                                            r"mean PSNR inf"):
        Trainer(st.cfg, st).fit()


def test_a_checkpoint_without_its_process_count_resumes_with_fresh_rng_saying_why(tmp_path):
    """A checkpoint whose state.pt lacks world_size (hand-edited, or older than the field) has its
    rng-rank0.pt: the warning said there was none."""
    first = ToyStage(make_cfg(tmp_path, max_steps=3))
    Trainer(first.cfg, first).fit()
    ck = tmp_path / "toy" / "checkpoints" / "step-00000003"
    state = torch.load(ck / "state.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "world_size"}, ck / "state.pt")
    assert (ck / "rng-rank0.pt").is_file()
    again = ToyStage(make_cfg(tmp_path, max_steps=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(again.cfg, again).fit(resume="auto")
    said = [str(w.message) for w in caught if "RNG streams start fresh" in str(w.message)]
    assert len(said) == 1 and "does not record the process count" in said[0] and "no RNG state" not in said[0]


def test_logged_loss_means_leave_skipped_steps_out(tmp_path):
    """A window of two steps whose second was skipped (NaN loss) logs the first step's loss, not
    half of it."""
    one = ToyStage(make_cfg(tmp_path / "one", max_steps=1, log_every=1))
    first = Trainer(one.cfg, one).fit().metrics["train/mse"]
    two = ToyStage(make_cfg(tmp_path / "two", max_steps=2, log_every=2), poison_at=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = Trainer(two.cfg, two).fit()
    assert res.nonfinite_skipped == 1 and res.metrics["train/mse"] == pytest.approx(first, rel=1e-12)
    all_bad = ToyStage(make_cfg(tmp_path / "three", max_steps=1, log_every=1), poison_at=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = Trainer(all_bad.cfg, all_bad).fit()
    assert "train/mse" not in res.metrics and res.metrics["train/nonfinite_skipped"] == 1


def test_the_progress_bar_shows_the_totals_first():
    from uniremoval.stages.trainer import progress_terms

    assert progress_terms(["fg", "ig", "pixel", "total"]) == ["total", "fg", "ig", "pixel"]
    assert progress_terms(["d_fake", "d_real", "d_total", "efg", "eig", "gan", "idt", "total"]) == [
        "total", "d_total", "d_fake", "d_real"]
    assert progress_terms(["mse"]) == ["mse"]


def test_resuming_another_runs_checkpoint_starts_a_run_of_its_own_in_mlflow(tmp_path, capsys):
    """--resume PATH of another run's checkpoint continues its state under this run's name, but as a
    new MLflow run tagged with where it came from: the other run's metrics and weights stay its own."""
    import json

    from mlflow.tracking import MlflowClient

    from uniremoval.config import TrackingConfig

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingConfig(uri=store, experiment="fork")
    a = ToyStage(make_cfg(tmp_path / "a").model_copy(update={"tracking": tracking}))
    ra = Trainer(a.cfg, a).fit()
    source = tmp_path / "a/toy/checkpoints/step-00000009"
    # its one validation scores far worse than a's best: still this run's best (a's is not its own)
    b = ScriptedVal(make_cfg(tmp_path / "b", optim={"lr": 0.01}).model_copy(update={"tracking": tracking}),
                    {10: 1e9}, "min")
    with pytest.warns(RuntimeWarning, match=r"1 changed setting\(s\): optim.lr: 0.05 -> 0.01"):
        rb = Trainer(b.cfg, b).fit(resume=str(source))
    assert rb.step == 10 and b.seen == [(1, 4)] and rb.run_id != ra.run_id
    assert json.loads((tmp_path / "b/toy/best.json").read_text())["step"] == 10  # its own best, not a's
    assert f"continuing {source} (another run's checkpoint) as the new run 'toy'" in capsys.readouterr().err
    client = MlflowClient(store)
    tags = client.get_run(rb.run_id).data.tags
    assert (tags["resumed_from"], tags["resumed_from_run"]) == (str(source), ra.run_id)
    assert tags["resumed_changes"] == "optim.lr: 0.05 -> 0.01"  # a new run still says what changed
    assert [m.step for m in client.get_metric_history(ra.run_id, "val/toy/err")] == [5, 10]
    assert [m.step for m in client.get_metric_history(rb.run_id, "val/toy/err")] == [10]
    # with tracking off, no run is reported (the checkpoint's id is not this job's run)
    c = ToyStage(make_cfg(tmp_path / "c"))
    assert Trainer(c.cfg, c).fit(resume=str(source)).run_id is None


def test_a_run_folder_copied_under_another_name_resumes_as_a_run_of_its_own_in_mlflow(tmp_path, capsys):
    """`cp -r runs/a runs/b` and `--resume auto` as run b continued a's MLflow run: b's metrics and
    weights were logged into a's. The checkpoint's run name differs from this config's: a new run,
    tagged with where it came from, as --resume PATH of another run's checkpoint is."""
    import shutil

    from mlflow.tracking import MlflowClient

    from uniremoval.config import TrackingConfig

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingConfig(uri=store, experiment="copies")
    a = ToyStage(make_cfg(tmp_path).model_copy(update={"tracking": tracking}))
    ra = Trainer(a.cfg, a).fit()
    shutil.copytree(tmp_path / "toy", tmp_path / "copy")
    b = ToyStage(make_cfg(tmp_path, epochs=3).model_copy(update={"tracking": tracking, "name": "copy"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the changed settings: name, train.epochs
        rb = Trainer(b.cfg, b).fit(resume="auto")
    source = tmp_path / "copy/checkpoints/step-00000010"
    assert rb.step == 15 and rb.run_id != ra.run_id
    assert f"continuing {source} (run 'toy''s checkpoint) as the new run 'copy'" in capsys.readouterr().err
    client = MlflowClient(store)
    tags = client.get_run(rb.run_id).data.tags
    assert (tags["resumed_from"], tags["resumed_from_run"]) == (str(source), ra.run_id)
    assert [m.step for m in client.get_metric_history(ra.run_id, "val/toy/err")] == [5, 10]  # a's alone
    assert [m.step for m in client.get_metric_history(rb.run_id, "val/toy/err")] == [15]
    # the copy's next resume is its own run again
    c = ToyStage(make_cfg(tmp_path, epochs=4).model_copy(update={"tracking": tracking, "name": "copy"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rc = Trainer(c.cfg, c).fit(resume="auto")
    assert rc.step == 20 and rc.run_id == rb.run_id


def test_resume_auto_on_a_newest_checkpoint_with_a_file_missing_names_the_one_before(tmp_path):
    """--resume auto on a newest checkpoint without state.pt said "give a checkpoints/step-* folder of a
    run, or --resume auto" (what was given); without its weights it gave no advice."""
    from uniremoval.errors import CheckpointError

    a = ToyStage(make_cfg(tmp_path))
    Trainer(a.cfg, a).fit()
    ckpts = tmp_path / "toy" / "checkpoints"
    newest, before = ckpts / "step-00000010", ckpts / "step-00000009"
    assert sorted(p.name for p in ckpts.iterdir()) == [before.name, newest.name]
    (newest / "state.pt").rename(tmp_path / "state.pt")
    b = ToyStage(make_cfg(tmp_path, epochs=3))
    with pytest.raises(CheckpointError) as caught:
        Trainer(b.cfg, b).fit(resume="auto")
    assert str(caught.value) == (
        f"resume checkpoint {newest} has no state.pt; it is the newest checkpoint of {ckpts}, copied in part or "
        f"edited (the trainer writes each one whole): resume the one before it with --resume {before}, or restore "
        "the file")
    (tmp_path / "state.pt").rename(newest / "state.pt")
    (newest / "net.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"{newest} lacks net\.safetensors; it is the newest checkpoint .* "
                                              rf"--resume {before}, or restore the file$"):
        Trainer(b.cfg, b).fit(resume="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # train.epochs changed
        assert Trainer(b.cfg, b).fit(resume=str(before)).step == 15  # the advice works


def test_a_cpu_resume_under_another_torch_thread_count_says_the_weights_will_differ(tmp_path):
    """On CPU a kernel's sums follow the thread count: a requeue onto a node with other cores (or another
    OMP_NUM_THREADS) continued silently with weights that differ in their last bits. It says so now."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ToyStage(make_cfg(tmp_path, max_steps=6))
        Trainer(a.cfg, a).fit()
        torch.set_num_threads(2)
        b = ToyStage(make_cfg(tmp_path))
        trainer = Trainer(b.cfg, b)
        with pytest.warns(RuntimeWarning, match=r"resuming .*step-00000006 with 2 torch threads \(saved with 1\): on "
                                                r"CPU the weights .* \(set OMP_NUM_THREADS=1 to continue it exactly\)"):
            result = trainer.fit(resume="auto")
        assert result.step == 10
        assert "torch threads: 1 -> 2" in trainer.resumed_changes
        c = ToyStage(make_cfg(tmp_path, epochs=3))  # step 10 was saved with 2 threads: nothing to say
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(c.cfg, c).fit(resume="auto")
        assert not [w for w in caught if "torch threads" in str(w.message)]
    finally:
        torch.set_num_threads(threads)


def test_resuming_an_earlier_checkpoint_of_the_run_moves_the_later_ones_aside(tmp_path, capsys):
    """--resume of an earlier checkpoint of the same run (going back to step 6 of 10 with another LR)
    retrained steps 7-10 but kept the old step-9/step-10 (a step saved already is not written again),
    so the next --resume auto continued the branch that was left. They are moved aside now."""
    import yaml

    from uniremoval.config import CheckpointConfig

    def keep_all(cfg):
        return cfg.model_copy(update={"checkpoint": CheckpointConfig(every_steps=3, keep_last=10)})

    cfg = keep_all(make_cfg(tmp_path))  # 10 steps, checkpoints at 3, 6, 9 and the end
    a = ToyStage(cfg)
    Trainer(cfg, a).fit()
    root = tmp_path / "toy" / "checkpoints"
    old_w = (root / "step-00000010" / "net.safetensors").read_bytes()
    b = ToyStage(keep_all(make_cfg(tmp_path, optim={"lr": 0.01})))
    with pytest.warns(RuntimeWarning, match="optim.lr: 0.05 -> 0.01"):
        Trainer(b.cfg, b).fit(resume=str(root / "step-00000006"))
    err = capsys.readouterr().err
    (aside,) = root.glob("superseded-at-step-00000006-*")
    assert (f"resuming {root / 'step-00000006'}, an earlier checkpoint of this run: its 2 later checkpoint(s) "
            f"(step-00000009, step-00000010) belong to the steps trained after it, so they are moved to {aside}") in err
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000009", "step-00000010"]
    assert (aside / "step-00000010" / "net.safetensors").read_bytes() == old_w
    new_w = (root / "step-00000010" / "net.safetensors").read_bytes()
    assert new_w != old_w and new_w == (tmp_path / "toy" / "last.safetensors").read_bytes()
    assert yaml.safe_load((root / "step-00000010" / "config.yaml").read_text())["optim"]["lr"] == 0.01
    # the next --resume auto continues the branch just trained
    c = ToyStage(keep_all(make_cfg(tmp_path, optim={"lr": 0.01}, epochs=3)))
    with pytest.warns(RuntimeWarning, match="train.epochs: 2 -> 3"):
        Trainer(c.cfg, c).fit(resume="auto")
    assert "an earlier checkpoint" not in capsys.readouterr().err
    assert c.seen[0] == (2, 0)  # from step 10 of the new branch: epoch 2, its first batch


def test_a_resume_against_a_store_without_its_run_logs_to_a_new_run_there(tmp_path):
    """A resume whose checkpoint's MLflow run is not in the store used now (the default
    sqlite:///mlflow.db of another working folder, another server) was told 'not found' on every call,
    taken for an outage: 'unreachable', everything spooled for ever. It now logs to a new run there."""
    from mlflow.tracking import MlflowClient

    from uniremoval.config import TrackingConfig

    first, other = (f"sqlite:///{tmp_path / name}" for name in ("first.db", "other.db"))
    a = ToyStage(make_cfg(tmp_path, max_steps=6).model_copy(
        update={"tracking": TrackingConfig(uri=first, experiment="moved")}))
    ra = Trainer(a.cfg, a).fit()
    b = ToyStage(make_cfg(tmp_path).model_copy(update={"tracking": TrackingConfig(uri=other, experiment="moved")}))
    with pytest.warns(RuntimeWarning, match=rf"MLflow run {ra.run_id} \(the run this checkpoint was logged to\) "
                                            rf"is not in {other}, the tracking store used now") as caught:
        rb = Trainer(b.cfg, b).fit(resume="auto")
    assert not [w for w in caught if "unreachable" in str(w.message)]
    assert rb.step == 10 and rb.run_id not in (None, ra.run_id)
    assert not (tmp_path / "toy" / "mlflow-spool.jsonl").exists()  # nothing held back
    run = MlflowClient(other).get_run(rb.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_run"] == ra.run_id
    assert [m.step for m in MlflowClient(other).get_metric_history(rb.run_id, "val/toy/err")] == [10]
    assert "optim.lr" in run.data.params  # the config, as any new run
    assert [m.step for m in MlflowClient(first).get_metric_history(ra.run_id, "val/toy/err")] == [5, 6]
    # the next resume continues that new run (the checkpoints now name it), in the same store
    c = ToyStage(make_cfg(tmp_path, epochs=3).model_copy(
        update={"tracking": TrackingConfig(uri=other, experiment="moved")}))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*MLflow", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="resuming .* train.epochs: 2 -> 3", category=RuntimeWarning)
        assert Trainer(c.cfg, c).fit(resume="auto").run_id == rb.run_id
    # a run deleted in the UI: the store refused every call as not active, all dropped; a new run too
    MlflowClient(other).delete_run(rb.run_id)
    d = ToyStage(make_cfg(tmp_path, epochs=4).model_copy(
        update={"tracking": TrackingConfig(uri=other, experiment="moved")}))
    with pytest.warns(RuntimeWarning, match=rf"MLflow run {rb.run_id} .* was deleted from {other}, the tracking "
                                            r"store used now; this job logs to a new run") as caught:
        rd = Trainer(d.cfg, d).fit(resume="auto")
    assert not [w for w in caught if "refused" in str(w.message)]
    run = MlflowClient(other).get_run(rd.run_id)
    assert rd.run_id != rb.run_id and run.info.status == "FINISHED" and run.info.lifecycle_stage == "active"
    assert run.data.tags["resumed_from_run"] == rb.run_id
    assert [m.step for m in MlflowClient(other).get_metric_history(rd.run_id, "val/toy/err")] == [20]


class _Recorder:
    """A tracker that keeps what log_metrics got, as (step, metrics)."""

    run_id = None

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def __getattr__(self, name):  # finish, set_tags, log_text, log_artifact...: nothing to keep
        return lambda *a, **k: None


def test_a_resumed_run_logs_the_same_training_means_as_an_uninterrupted_one(tmp_path):
    """Preempted after step 6 of a 4-step log window, then resumed: the mean logged at step 8 is over
    steps 5-8 as in the uninterrupted run (it was over 7-8 only: the window's sums were lost)."""
    def mse_log(root, signal_at=None, resume=None):
        stage = ToyStage(make_cfg(root, log_every=4), signal_at=signal_at)
        rec = _Recorder()
        res = Trainer(stage.cfg, stage, tracker=rec).fit(resume=resume)
        return res, {s: m["train/mse"] for s, m in rec.logged if "train/mse" in m}

    _, ref = mse_log(tmp_path / "a")
    assert sorted(ref) == [4, 8, 10]
    first, part = mse_log(tmp_path / "b", signal_at=5)
    assert first.status == "preempted" and first.step == 6 and sorted(part) == [4]
    res, rest = mse_log(tmp_path / "b", resume="auto")
    assert res.step == 10 and sorted(rest) == [8, 10]
    assert part[4] == ref[4] and rest[8] == pytest.approx(ref[8], rel=1e-12) and rest[10] == pytest.approx(ref[10], rel=1e-12)


FUSED = {"lr": 0.05, "fused": True}  # torch's fused Adam on CPU: the trainer's device-side non-finite check


def _fit_collecting_warnings(stage):
    trainer = Trainer(stage.cfg, stage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = trainer.fit()
    return trainer, res, [str(w.message) for w in caught if "non-finite" in str(w.message)]


def test_device_side_check_skips_the_same_updates_as_the_host_check(tmp_path, monkeypatch):
    """With the fused optimiser the non-finite check is a device flag the kernel reads (no host wait
    before the backward): the run must end bit-identical to the host check's, skip and warn the same."""
    from uniremoval.stages import fast

    device = ToyStage(make_cfg(tmp_path / "device", FUSED, max_steps=6), poison_at=1)
    trainer, res, msgs = _fit_collecting_warnings(device)
    assert trainer._defer_check and res.nonfinite_skipped == 1 and res.step == 6
    with monkeypatch.context() as m:
        m.setattr(fast, "skips_on_device", lambda opt: False)
        host = ToyStage(make_cfg(tmp_path / "host", FUSED, max_steps=6), poison_at=1)
        host_trainer, host_res, host_msgs = _fit_collecting_warnings(host)
    assert not host_trainer._defer_check and host_res.nonfinite_skipped == 1
    assert msgs == host_msgs and "step 2" in msgs[0] and "mse=nan" in msgs[0]
    torch.testing.assert_close(weights(tmp_path / "device/toy/last.safetensors"),
                               weights(tmp_path / "host/toy/last.safetensors"), rtol=0, atol=0)
    # The skipped update left Adam's state as it was: its step count is one less than the steps run.
    opt = trainer.optimizers["net"]
    assert [float(s["step"]) for s in opt.state.values()] == [5.0]


def test_device_side_check_drops_a_whole_accumulation_window(tmp_path):
    one = ToyStage(make_cfg(tmp_path / "one", FUSED, max_steps=1, grad_accum=2))
    Trainer(one.cfg, one).fit()
    two = PoisonFirstMicro(make_cfg(tmp_path / "two", FUSED, max_steps=2, grad_accum=2))
    _, res, msgs = _fit_collecting_warnings(two)
    assert res.step == 2 and res.nonfinite_skipped == 1 and len(two.seen) == 4
    assert len(msgs) == 1 and "step 2" in msgs[0] and "mse=nan" in msgs[0]
    torch.testing.assert_close(weights(tmp_path / "two/toy/last.safetensors"),
                               weights(tmp_path / "one/toy/last.safetensors"), rtol=0, atol=0)


def test_device_side_check_is_read_a_step_late_and_still_stops(tmp_path):
    """An update's flag stays on the device through its own step and is read at the end of the next
    (or at a log or checkpoint, which read them all); nonfinite=stop and max_nonfinite still stop."""

    class Watching(ToyStage):
        def training_step(self, batch, ctx):
            pending.append([u.step for u in ctx._t._pending])
            return super().training_step(batch, ctx)

    pending: list[list[int]] = []
    cfg = make_cfg(tmp_path / "w", FUSED, log_every=4, val_every=100)  # checkpoints at 3, 6, 9
    res = Trainer(cfg, Watching(cfg)).fit()
    assert res.step == 10
    # Before update s+1 runs, update s is still unread unless step s ended with a log or a checkpoint.
    assert pending == [[]] + [[] if s in {3, 4, 6, 8, 9} else [s] for s in range(1, 10)], pending

    st = ToyStage(make_cfg(tmp_path / "t", FUSED, max_steps=6, nonfinite="stop"), poison_at=2)
    with pytest.raises(UniremovalError, match=r"non-finite loss at step 3.*mse=nan"):
        Trainer(st.cfg, st).fit()
    st3 = ToyStage(make_cfg(tmp_path / "u", FUSED, max_steps=4, max_nonfinite=0), poison_at=0)
    with pytest.raises(UniremovalError, match="max_nonfinite=0"):
        Trainer(st3.cfg, st3).fit()


class Prefetching(ToyStage):
    """Its epochs' iterators prefetch `lookahead` batches ahead, as a StepLoader's workers do; it
    records when each epoch's iterator is made (how many batches were trained by then) and closed."""

    def __init__(self, cfg, lookahead: int, **kw):
        super().__init__(cfg, **kw)
        self.lookahead, self.made, self.closed = lookahead, [], []

    def train_batches(self, epoch, start, rank, world_size):
        stage, inner = self, super().train_batches(epoch, start, rank, world_size)
        stage.made.append((epoch, start, len(stage.seen)))

        class Batches:
            lookahead = stage.lookahead

            def __iter__(self):
                return self

            def __next__(self):
                return next(inner)

            def close(self):
                stage.closed.append(epoch)
        return Batches()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_next_epochs_loader_starts_while_this_one_drains_with_the_same_batches(tmp_path, grad_accum):
    """Each epoch's loader workers start up (fork, shard opening, shuffle buffers) before its first
    batch: made at the epoch's start, that stalls the step. The trainer makes the next epoch's
    iterator once no more micro-batches than the loader prefetches are left to fetch (its workers
    are idle from there), never one past the run's end, and trains on the same batches."""
    runs = {}
    for lookahead in (0, 3):
        st = Prefetching(make_cfg(tmp_path / str(lookahead), epochs=3, max_steps=12, grad_accum=grad_accum), lookahead)
        assert Trainer(st.cfg, st).fit().step == 12
        runs[lookahead] = st
    micro = 5 * grad_accum  # micro-batches an epoch (steps_per_epoch 5)
    assert runs[0].made == [(0, 0, 0), (1, 0, micro), (2, 0, 2 * micro)]  # at each epoch's start
    # Made after fetching the micro-batch that leaves 3 to fetch, before training on it; max_steps=12
    # ends the run in epoch 2, so epoch 2 has no successor to start.
    assert runs[3].made == [(0, 0, 0), (1, 0, micro - 4), (2, 0, 2 * micro - 4)]
    assert runs[3].closed == [0, 1, 2]  # each epoch's workers freed at its end
    assert runs[0].seen == runs[3].seen and len(runs[3].seen) == 12 * grad_accum
    assert torch.equal(weights(tmp_path / "0" / "toy" / "last.safetensors"),
                       weights(tmp_path / "3" / "toy" / "last.safetensors"))


def test_a_run_stopped_after_the_next_epoch_started_closes_it(tmp_path):
    st = Prefetching(make_cfg(tmp_path), 3, signal_at=3)  # epoch 1's iterator is made at step 2 of 5
    res = Trainer(st.cfg, st).fit()
    assert res.status == "preempted" and res.step == 4
    assert [m[0] for m in st.made] == [0, 1]
    assert sorted(st.closed) == [0, 1]  # the current epoch's and the one started ahead
    rest = Prefetching(make_cfg(tmp_path), 3)
    assert Trainer(rest.cfg, rest).fit(resume="auto").step == 10
    assert rest.made[:2] == [(0, 4, 0), (1, 0, 0)]  # resumed inside epoch 0: its last step, then epoch 1 ahead


def test_a_second_run_in_one_process_under_another_precision_says_what_to_do(tmp_path):
    """From a notebook, a second fit with another train.mixed_precision failed in accelerate with a raw
    'AcceleratorState has already been initialized'. The trainer names the setting and the ways out.
    (In a subprocess: accelerate's state is per process, and the suite's own must stay as it is.)"""
    import subprocess

    script = tmp_path / "twice.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from uniremoval.config import TeacherStage\n"
        "from uniremoval.errors import ConfigError\n"
        "from uniremoval.stages.trainer import build_accelerator\n"
        "def cfg(mp):\n"
        "    return TeacherStage(stage='teacher', degradation='haze', train={'cpu': True, 'mixed_precision': mp})\n"
        "build_accelerator(cfg('no'))\n"
        "try:\n"
        "    build_accelerator(cfg('bf16'))\n"
        "except ConfigError as exc:\n"
        "    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.search(r"refused: train.mixed_precision=bf16 / train.cpu=True: an earlier run in this Python process "
                     r"set accelerate up otherwise.*AcceleratorState._reset_state\(True\)", out), out


def test_every_run_says_how_many_samples_an_epoch_reads(tmp_path, capsys):
    """An epoch is train.steps_per_epoch optimiser steps on any process count, so the samples it reads
    (and what the epoch-clocked a1/l1 decay means in samples) grow with the processes: the configs'
    'one pass over the smallest set' held on one process only, unsaid. Each run now says it."""
    from types import SimpleNamespace

    stage = ToyStage(make_cfg(tmp_path, max_steps=1, grad_accum=2))
    trainer = Trainer(stage.cfg, stage)
    trainer.fit()
    assert ("an epoch: train.steps_per_epoch 5 x 32 samples a step (data.batch_size 16 x train.grad_accum 2 x "
            "1 process(es)) = 160 samples") in capsys.readouterr().err
    trainer.accelerator = SimpleNamespace(num_processes=8, is_main_process=True)  # as on 8 GPUs
    trainer._print_epoch_size()
    assert "x 256 samples a step (data.batch_size 16 x train.grad_accum 2 x 8 process(es)) = 1,280 samples" in \
        capsys.readouterr().err
    # DA reads as many clear images beside its degraded ones: said, not counted as if absent
    from uniremoval.stages.da import DomainAdaptation

    stage.also_reads = DomainAdaptation.also_reads
    trainer._print_epoch_size()
    assert capsys.readouterr().err.rstrip().endswith(
        "= 1,280 samples; as many real clear images (data.clear) beside them")


def test_a_warning_every_rank_would_give_is_given_once(tmp_path):
    """Resume and config warnings (the same config and checkpoint on every rank) printed once per rank:
    8 copies on 8 GPUs. The main process gives them; another rank stays quiet."""
    from types import SimpleNamespace

    stage = ToyStage(make_cfg(tmp_path, max_steps=12))
    trainer = Trainer(stage.cfg, stage)
    with pytest.warns(RuntimeWarning, match=r"train.max_steps=12 is beyond the run's end"):
        trainer._check_run_length(10)
    trainer.accelerator = SimpleNamespace(is_main_process=False, num_processes=2)  # as rank 1 of two
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer._check_run_length(10)


def test_a_finished_run_trained_on_keeps_the_weights_it_finished_with(tmp_path, capsys):
    """A finished run extended (more train.epochs, then --resume auto) exported new last/best over the ones
    it finished with: a DA run's model.init or an eval that read them then named (by sha256) weights that
    no longer existed anywhere. They are kept beside as last-step<N>/best-step<N> first."""
    from mlflow.tracking import MlflowClient

    from uniremoval.config import TrackingConfig
    from uniremoval.models.checkpoint import checkpoint_sha256

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def cfg(**train):
        return make_cfg(tmp_path, **train).model_copy(update={"tracking": TrackingConfig(uri=store, experiment="x")})

    run = tmp_path / "toy"
    first = ToyStage(cfg())
    result = Trainer(first.cfg, first).fit()
    assert result.status == "finished"
    finished = {w: checkpoint_sha256(run / f"{w}.safetensors") for w in ("last", "best")}
    best_step = json.loads((run / "best.json").read_text())["step"]
    capsys.readouterr()
    longer = ToyStage(cfg(epochs=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # train.epochs changed: named on resume
        assert Trainer(longer.cfg, longer).fit(resume="auto").step == 15
    out = capsys.readouterr().err
    assert (f"this run finished at step 10 and now trains on to step 15: the weights it exported, which later runs "
            f"may have read (their sha256 tags name them), are kept as last-step00000010.safetensors, "
            f"best-step{best_step:08d}.safetensors in {run} (and in the MLflow run") in out, out
    # ...and the run still answers a search by the hash of what it finished with (a DA run's init_sha256)
    client = MlflowClient(store)
    found = client.search_runs([client.get_experiment_by_name("x").experiment_id],
                               f"tags.`weights_sha256.last-step00000010` = '{finished['last']}'")
    assert [r.info.run_id for r in found] == [result.run_id]
    assert found[0].data.tags[f"weights_sha256.best-step{best_step:08d}"] == finished["best"]
    assert found[0].data.tags["weights_sha256.last"] != finished["last"]
    assert "weights/last-step00000010.safetensors" in {a.path for a in client.list_artifacts(result.run_id,
                                                                                            "weights")}
    assert checkpoint_sha256(run / "last-step00000010.safetensors") == finished["last"] != checkpoint_sha256(
        run / "last.safetensors")
    assert checkpoint_sha256(run / f"best-step{best_step:08d}.safetensors") == finished["best"]
    assert json.loads((run / "last-step00000010.json").read_text())["step"] == 10
    # a run resumed before its end (a preemption) has nothing to keep: its last export is not at that step
    capsys.readouterr()
    again = ToyStage(cfg(epochs=4), signal_at=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        Trainer(again.cfg, again).fit(resume="auto")
    assert "now trains on" in capsys.readouterr().err  # finished at 15: kept once more
    rest = ToyStage(cfg(epochs=4))
    Trainer(rest.cfg, rest).fit(resume="auto")
    assert "now trains on" not in capsys.readouterr().err
    assert sorted(p.name for p in run.glob("last-step*.safetensors")) == ["last-step00000010.safetensors",
                                                                          "last-step00000015.safetensors"]
