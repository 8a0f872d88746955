"""Config loading: valid files, overrides, extends, and every kind of bad input with its message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uniremoval.config import KTStage, ablation_flags, config_hash, load_config
from uniremoval.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def kt_file(tmp_path):
    return write(tmp_path / "kt.yaml", """
stage: kt
name: trial
optim: {lr: 2.0e-5}
data:
  batch_size: 16
  train:
    - {name: ots, shards: cache/ots, degradation: haze}
    - {name: rain1400, shards: [cache/rain/a.tar, cache/rain/b.tar], degradation: rain, weight: 2}
    - {name: gopro, shards: cache/gopro, degradation: blur}
loss: {a1: 0.5, a2: 0.1, tau: 1.0e-6}
""")


def test_valid_file_resolves_defaults_and_types(kt_file):
    cfg = load_config(kt_file)
    assert isinstance(cfg, KTStage)
    assert cfg.optim.lr == 2e-5
    assert cfg.data.train[0].shards == ["cache/ots"]  # a single string becomes a list
    assert cfg.data.train[1].weight == 2.0
    assert cfg.loss.tau == 1e-6
    assert cfg.data.degradations == ["haze", "rain", "blur"]
    assert ablation_flags(cfg) == {"use_icl": True, "use_fcl": True}


def test_overrides_apply_last_and_parse_yaml_values(kt_file):
    cfg = load_config(kt_file, ["optim.lr=1e-4", "data.batch_size=8", "data.train.1.weight=0.5",
                                "loss.use_fcl=false", "optim.betas=[0.5, 0.999]"])
    assert cfg.optim.lr == 1e-4
    assert cfg.data.batch_size == 8
    assert cfg.data.train[1].weight == 0.5
    assert cfg.loss.use_fcl is False
    assert cfg.optim.betas == (0.5, 0.999)
    assert load_config(kt_file, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML's no = False
    assert config_hash(cfg) != config_hash(load_config(kt_file))


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    write(tmp_path / "base.yaml", """
project: paper
data: {batch_size: 16, crop_size: 128, degradations: [haze, rain, blur, snow]}
optim: {lr: 2.0e-5, betas: [0.9, 0.999]}
""")
    child = write(tmp_path / "ablation" / "bkt.yaml", """
extends: ../base.yaml
stage: kt
data: {degradations: [haze, rain]}
loss: {use_icl: false, use_fcl: false}
""")
    cfg = load_config(child)
    assert cfg.project == "paper"
    assert cfg.data.batch_size == 16 and cfg.data.crop_size == 128  # merged from the base
    assert cfg.data.degradations == ["haze", "rain"]  # lists replace, they do not append
    assert ablation_flags(cfg) == {"use_icl": False, "use_fcl": False}


def test_shipped_configs_all_load():
    """Every shipped stage config resolves. A partial base (extended by others) may only lack required
    keys that its children fill in."""
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    bases = set()
    for path in configs:
        extends = (yaml.safe_load(path.read_text()) or {}).get("extends") or []
        for base in [extends] if isinstance(extends, str) else extends:
            bases.add((path.parent / base).resolve())
    loaded = 0
    for path in configs:
        try:
            load_config(path)
            loaded += 1
        except ConfigError as exc:
            if "has no 'stage' key, so it is no stage config" in str(exc):
                continue  # not a stage config (e.g. configs/demo/demo.yaml, the demo's own settings)
            lines = str(exc).splitlines()[1:]
            if path.resolve() not in bases or not all("is missing" in line for line in lines):
                raise
    assert loaded >= 15, "configs/ should hold the teacher, cache, kt, da, paper, ablation and demo configs"


def message(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_unknown_key_names_file_key_and_allowed_keys(kt_file, tmp_path):
    bad = write(tmp_path / "bad.yaml", "stage: kt\noptim: {lrr: 0.1}\n")
    msg = message(bad)
    assert str(bad) in msg and "unknown key 'optim.lrr'" in msg
    assert "allowed keys here:" in msg and "lr" in msg and "betas" in msg


def test_unknown_key_from_override_names_the_override(kt_file):
    msg = message(kt_file, ["loss.alpha=3"])
    assert "override 'loss.alpha=3'" in msg and "unknown key 'loss.alpha'" in msg


def test_wrong_type_names_key_and_value(kt_file):
    msg = message(kt_file, ["data.batch_size=many"])
    assert "key 'data.batch_size'" in msg and "'many'" in msg and "integer" in msg


def test_out_of_range_names_key_value_and_bound(tmp_path):
    bad = write(tmp_path / "neg.yaml", "stage: kt\noptim: {lr: -0.5}\n")
    msg = message(bad)
    assert str(bad) in msg and "key 'optim.lr'" in msg and "-0.5" in msg and "greater than 0" in msg


def test_out_of_range_in_list_item(kt_file):
    msg = message(kt_file, ["data.train.0.weight=0"])
    assert "key 'data.train.0.weight'" in msg and "greater than 0" in msg


def test_missing_file(tmp_path):
    msg = message(tmp_path / "nope.yaml")
    assert "config file not found" in msg and "nope.yaml" in msg
    # a folder is not "not found" (`config show configs/`)
    assert message(tmp_path) == f"config {tmp_path} is a folder; give a YAML file (e.g. {tmp_path / 'kt.yaml'})"


def test_missing_base_file(tmp_path):
    bad = write(tmp_path / "child.yaml", "extends: base_missing.yaml\nstage: kt\n")
    assert "base file not found" in message(bad) and "base_missing.yaml" in message(bad)


def test_malformed_yaml_gives_line(tmp_path):
    bad = write(tmp_path / "broken.yaml", "stage: kt\noptim: {lr: 1e-4\ndata: [\n")
    msg = message(bad)
    assert "malformed YAML" in msg and str(bad) in msg and "line" in msg


def test_missing_or_bad_stage(tmp_path):
    # a file without `stage` is most likely a base file (configs/base.yaml): say so, not "got None"
    msg = message(write(tmp_path / "a.yaml", "name: x\n"))
    assert f"{tmp_path / 'a.yaml'} has no 'stage' key, so it is no stage config" in msg
    assert "`stage: teacher|cache|kt|da|eval`" in msg and "got None" not in msg
    assert "'teach'" in message(write(tmp_path / "b.yaml", "stage: teach\n"))


def test_wrong_stage_for_command(kt_file):
    with pytest.raises(ConfigError, match="needs a 'da' config"):
        load_config(kt_file, stage="da")


def test_cross_field_rule(kt_file):
    msg = message(kt_file, ["data.crop_size=100"])
    assert "multiple of 8" in msg


def test_rules_across_sections_name_file_key_value_and_allowed(kt_file, tmp_path):
    # A source's degradation must be a configured type (the loader refused it only after the MLflow
    # run had started); named in the file that set it.
    bad = write(tmp_path / "deg.yaml", f"extends: {kt_file}\ndata:\n  degradations: [haze, rain]\n"
                "  val: [{name: v, shards: s, degradation: hze}]\n")
    msg = message(bad)
    assert str(bad) in msg and "'data.val.0.degradation'" in msg and "'hze'" in msg and "['haze', 'rain']" in msg
    msg = message(kt_file, ["data.train.1.degradation=fog"])
    assert "override 'data.train.1.degradation=fog'" in msg and "'fog'" in msg
    # cached teacher features are cropped on the feature grid: crop_size must be a multiple of it
    msg = message(kt_file, ["data.crop_size=136"])
    assert "'data.crop_size'" in msg and "136" in msg and "data.feature_cell=16" in msg
    assert load_config(kt_file, ["data.crop_size=136", "teachers.mode=online"]).data.crop_size == 136
    # a misspelt teacher type is refused (the real type's old teacher stayed in use, silently)
    msg = message(kt_file, ["teachers.checkpoints.hzae=/x"])
    assert "'teachers.checkpoints.hzae'" in msg and "'/x'" in msg and "names no type of data.degradations" in msg
    cache = Path(__file__).resolve().parents[1] / "configs" / "cache.yaml"
    assert "'teachers.checkpoints.hzae'" in message(cache, ["teachers.checkpoints.hzae=/x"])
    # DA's PatchGAN halves the crop per layer: a crop it cannot take stops here, not at step 1
    da = Path(__file__).resolve().parents[1] / "configs" / "paper" / "da.yaml"
    msg = message(da, ["data.crop_size=16"])
    assert "'data.crop_size'" in msg and "16" in msg and "at least 24" in msg and "n_layers=3" in msg
    assert load_config(da, ["data.crop_size=16", "discriminator.n_layers=2"]).data.crop_size == 16
    assert load_config(da, ["data.crop_size=24"]).data.crop_size == 24
    # a negative VGG layer weight would make the student maximise that layer's contrastive term
    msg = message(kt_file, ["features.layer_weights=[-1, 1, 1, 1, 1]"])
    assert "'features.layer_weights.0'" in msg and "-1" in msg and "greater than or equal to 0" in msg


def test_rules_within_a_section_name_key_and_value(kt_file, tmp_path):
    # one VGG weight per phi layer: a missing weight would silently drop a layer from L_ig
    msg = message(kt_file, ["features.layers=[relu1_1, relu2_1]", "features.layer_weights=[1.0]"])
    assert "'features'" in msg and "layers has 2 entries but layer_weights has 1" in msg
    ok = load_config(kt_file, ["features.layers=[relu1_1, relu2_1]", "features.layer_weights=[0.5, 1.0]"])
    assert ok.features.layer_weights == [0.5, 1.0]
    # degradation types: unique (labels index them), and 'clear' is the clean-image label
    msg = message(kt_file, ["data.degradations=[haze, rain, haze]"])
    assert "'data.degradations'" in msg and "must be unique" in msg and "['haze', 'rain', 'haze']" in msg
    msg = message(kt_file, ["data.degradations=[haze, clear]"])
    assert "'data.degradations'" in msg and "'clear' is reserved" in msg
    # Adam's betas in [0, 1)
    msg = message(kt_file, ["optim.betas=[0.9, 1.0]"])
    assert "'optim.betas'" in msg and "each beta must be in [0, 1)" in msg
    assert load_config(kt_file, ["optim.betas=[0.0, 0.99]"]).optim.betas == (0.0, 0.99)
    # the cross-section degradation rule holds for DA too (its real sets name a type each)
    da = write(tmp_path / "da.yaml", "stage: da\ndata:\n  degradations: [haze]\n"
               "  train: [{name: r, shards: s, degradation: rain}]\n")
    msg = message(da)
    assert "'data.train.0.degradation'" in msg and "'rain'" in msg and "['haze']" in msg


def test_da_validation_metrics_are_checked_at_load(tmp_path):
    # DA builds its IQA scorer at the first validation; a typo, a capital or a metric that needs a
    # target stopped the run only then (train.val_every steps in), before any checkpoint.
    da = write(tmp_path / "da.yaml", "stage: da\nval_iqa: {metrics: [piqe, brisque]}\n")
    assert load_config(da).val_iqa.metrics == ["piqe", "brisque"]
    for bad in ("piqee", "PIQE", "psnr"):
        msg = message(da, [f"val_iqa.metrics=[{bad}]"])
        assert "'val_iqa.metrics'" in msg and bad in msg and "brisque, piqe, niqe" in msg


def test_bad_override_syntax(kt_file):
    assert "must look like key.sub=value" in message(kt_file, ["optim.lr"])
    assert "list index" in message(kt_file, ["data.train.7.weight=1"])


def test_extends_cycle(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\nstage: kt\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    assert "cycle" in message(tmp_path / "a.yaml")


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "uniremoval", *args], check=False, capture_output=True, text=True, cwd=cwd)


def test_config_show_prints_resolved_yaml(kt_file):
    out = run_cli("config", "show", str(kt_file), "optim.lr=3e-4")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.0003" in out.stdout and "stage: kt" in out.stdout and "config hash" in out.stdout


def test_config_show_bad_input_exit_code_and_message(tmp_path):
    bad = write(tmp_path / "neg.yaml", "stage: kt\ndata: {batch_size: 0}\n")
    out = run_cli("config", "show", str(bad))
    assert out.returncode == 2
    assert out.stderr.startswith("error: invalid config") and "data.batch_size" in out.stderr


def test_set_overrides_work_in_every_command_that_takes_a_config(kt_file, tmp_path, capsys):
    """`eval --config F --set k=v` is how eval spells an override; train, cache and config refused
    --set as an unrecognized argument. They take it too, applied after the key=value ones."""
    from uniremoval.cli import main

    assert main(["config", "show", str(kt_file), "optim.lr=1e-4", "--set", "optim.lr=3e-4",
                 "--set", "data.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out and "batch_size: 8" in out
    assert main(["config", "hash", str(kt_file), "--set", "optim.lr=3e-4"]) == 0
    assert capsys.readouterr().out == f"{config_hash(load_config(kt_file, ['optim.lr=3e-4']))}\n"
    # ...and `config` takes the file as --config too, as every other command spells it (it was refused)
    want = f"{config_hash(load_config(kt_file, ['optim.lr=1e-4']))}\n"
    for argv in (["--config", str(kt_file), "optim.lr=1e-4"], ["optim.lr=1e-4", "--config", str(kt_file)]):
        assert main(["config", "hash", *argv]) == 0 and capsys.readouterr().out == want
    assert main(["config", "show", str(kt_file), "--config", str(kt_file)]) == 2
    assert "error: two config files given" in capsys.readouterr().err
    for argv in ([], ["optim.lr=1e-4"]):
        assert main(["config", "show", *argv]) == 2
        assert "error: config show needs a config file: FILE or --config FILE" in capsys.readouterr().err
    cache = write(tmp_path / "cache.yaml", "stage: cache\n")
    for argv in (["train", "kt", "--config", str(kt_file)], ["cache", "--config", str(cache)]):
        assert main([*argv, "--set", "optim.lr=abc"]) == 2  # the override reached the config, nothing ran
        err = capsys.readouterr().err
        assert err.startswith("error: invalid config") and "override 'optim.lr=abc'" in err, err


@pytest.mark.parametrize("group", [None, "shards", "train", "cache", "eval", "restore", "report", "demo", "config"])
def test_help_for_every_group(group):
    out = run_cli(*([group] if group else []), "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_every_option_of_every_command_says_what_it_does():
    """Each option and argument of every command and action has a help text (synth's --degradation and
    --seed and report's --format had none), and one whose default is not None names it."""
    import argparse

    from uniremoval.cli import build_parser

    def parsers(p, path):
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from parsers(child, [*path, name])

    missing = []
    for path, p in parsers(build_parser(), ["uniremoval"]):
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            text = action.help or ""
            if not text:
                missing.append(f"{' '.join(path)} {name}: no help")
            elif (action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text
                  and action.option_strings):
                missing.append(f"{' '.join(path)} {name}: default {action.default!r} not named")
    assert not missing, "\n".join(missing)


def test_missing_inputs_are_named_before_anything_starts(tmp_path, monkeypatch):
    """A missing shard folder (validation sets included: they were found only at the first
    validation), model.init or teacher checkpoint is named with its key and the command that writes it."""
    import shutil

    from uniremoval.cli import main
    from uniremoval.stages.preflight import check_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards" / "ots").mkdir(parents=True)
    (tmp_path / "shards" / "ots" / "ots-000000.tar").touch()
    # a project folder holding the shipped teacher configs (the hint names them where its command reads them)
    shutil.copytree(REPO / "configs" / "teacher", tmp_path / "configs" / "teacher")
    cfg = load_config(REPO / "configs" / "teacher" / "haze.yaml")
    with pytest.raises(ConfigError, match=r"read from .*\n  data\.val\.0 \(sots_outdoor\): shards/sots_outdoor does not "
                                          r"exist; `uniremoval shards build\|synth \.\.\. --out shards/sots_outdoor` \(README: Data preparation\) writes it$"):
        check_inputs(cfg)
    check_inputs(load_config(REPO / "configs" / "teacher" / "haze.yaml",
                             ["data.val.0.shards=https://host/sots-{000000..000001}.tar"]))  # URLs pass
    with pytest.raises(ConfigError) as err:
        check_inputs(load_config(REPO / "configs" / "paper" / "kt.yaml"))
    assert "data.train.0 (ots): cache/ots does not exist; `uniremoval cache --config configs/cache.yaml`" in str(err.value)
    assert "teachers.checkpoints.blur: outputs/teacher-blur/best.safetensors does not exist; `uniremoval train " \
        "teacher --config configs/teacher/blur.yaml` writes it, or set teachers.checkpoints.blur=PATH" in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.init: outputs/paper-kt/last\.safetensors does not exist; "
                                          r"`uniremoval train kt` writes it"):
        check_inputs(load_config(REPO / "configs" / "paper" / "da.yaml"))
    # the cache checks only the teachers of its sources; the CLI refuses before any run starts (status 2)
    with pytest.raises(ConfigError) as err:
        only_haze = "data.train=[{name: ots, shards: shards/ots, degradation: haze}]"
        check_inputs(load_config(REPO / "configs" / "cache.yaml", [only_haze]))
    assert "teachers.checkpoints.haze" in str(err.value) and "checkpoints.rain" not in str(err.value)
    assert main(["train", "da", "--config", str(REPO / "configs" / "paper" / "da.yaml")]) == 2
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_overrides_may_follow_the_options(capsys):
    """`train kt --config c.yaml a=1 --resume auto b=2`: argparse alone refused `b=2` (one run of a
    positional list); every override is kept, in command-line order, and an unknown option is refused."""
    from uniremoval.cli import build_parser, parse

    parser = build_parser()
    args = parse(parser, ["train", "kt", "--config", "c.yaml", "optim.lr=1e-4", "--resume", "auto",
                          "train.epochs=3", "optim.lr=5e-5"])
    assert args.resume == "auto" and args.overrides == ["optim.lr=1e-4", "train.epochs=3", "optim.lr=5e-5"]
    args = parse(parser, ["cache", "--config", "c.yaml", "--check", "data.batch_size=2"])
    assert args.check and args.overrides == ["data.batch_size=2"]
    with pytest.raises(SystemExit) as exit_:
        parse(parser, ["train", "kt", "--config", "c.yaml", "--resume", "auto", "a=1", "--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus\n" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path, capsys):
    """`uniremoval config show FILE | head -1` (or `shards inspect --json | head`): the pipe closes
    before the output is written. That printed 'error: Broken pipe ... --resume auto' (the file
    system error handler) or a traceback at exit; now nothing on stderr and SIGPIPE's status."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "uniremoval", "config", "show", str(REPO / "configs/kt.yaml")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before the command has imported anything and written
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE, err
    assert err == "", err
    # A broken pipe that is not stdout's reader leaving stays one error line.
    from uniremoval import cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    args = cli.build_parser().parse_args(["config", "hash", str(REPO / "configs/kt.yaml")])
    args.func = broken
    import unittest.mock

    with unittest.mock.patch.object(cli, "parse", return_value=args):
        assert cli.main([]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Broken pipe" in lines[0], lines


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, kt_file):
    """PyYAML keeps the last of two equal keys and drops the first without a word: two `optim:`
    sections lost the first one's learning rate."""
    dup = write(tmp_path / "dup.yaml", f"extends: {kt_file}\noptim:\n  lr: 0.0005\noptim:\n  weight_decay: 0.01\n")
    msg = message(dup)
    assert str(dup) in msg and "line 4" in msg and "key 'optim' appears twice in one mapping (first at line 2)" in msg
    nested = write(tmp_path / "nested.yaml", f"extends: {kt_file}\ntrain: {{steps_per_epoch: 5, steps_per_epoch: 50}}\n")
    assert "key 'steps_per_epoch' appears twice" in message(nested)
    # YAML anchors and merge keys still work: a merged key given again is an override, not a duplicate
    merged = write(tmp_path / "merged.yaml", f"extends: {kt_file}\ndata:\n  val:\n"
                   "    - &v {name: a, shards: s, degradation: haze}\n    - {<<: *v, name: b}\n")
    assert [(v.name, v.degradation) for v in load_config(merged).data.val] == [("a", "haze"), ("b", "haze")]


def test_a_run_name_cannot_leave_output_dir(kt_file):
    for name in ("..", "."):
        msg = message(kt_file, [f"name={name}"])
        assert "key 'name'" in msg and f"'{name}'" in msg
    assert load_config(kt_file, ["name=run.v2"]).name == "run.v2"


def test_section_rules_name_the_key_not_the_whole_section(kt_file):
    msg = message(kt_file, ["data.crop_size=100"])  # a rule of the architecture's, across sections
    assert ("override 'data.crop_size=100': key 'data.crop_size': bad value 100: must be a multiple of 8 for "
            "model.arch=mprnet (e.g. 96)") in msg
    assert "'train':" not in msg  # the data section's other values are not dumped
    msg = message(kt_file, ["features.layers=[relu1_1, relu2_1]", "features.layer_weights=[1.0]"])
    assert "section 'features': layers has 2 entries but layer_weights has 1" in msg and "'weights':" not in msg


def test_an_override_yaml_read_as_a_number_says_to_quote_it(kt_file):
    msg = message(kt_file, ["name=2024"])
    assert "key 'name': bad value 2024" in msg and "quote the text, e.g. name='\"2024\"'" in msg


def test_a_boolean_is_not_a_number(kt_file):
    """pydantic's lax mode reads `true` as 1: `data.batch_size=true` trained with batches of one."""
    msg = message(kt_file, ["data.pin_memory=false", "data.batch_size=true"])
    assert ("override 'data.batch_size=true': key 'data.batch_size': bad value True: Value error, true is a "
            "boolean; give a number") in msg
    assert "data.pin_memory=false" not in msg  # the other override of the section is not blamed
    assert "key 'optim.lr': bad value False: Value error, false is a boolean" in message(kt_file, ["optim.lr=false"])
    assert load_config(kt_file, ["train.cpu=true"]).train.cpu is True  # booleans stay booleans


def test_an_error_names_the_file_of_extends_that_set_the_bad_value(kt_file, tmp_path):
    """A bad value set in a file extending another was blamed on the base file (the first file that set
    any key of the section), and a whole section set to null on the base file's keys under it."""
    child = write(tmp_path / "child.yaml", f"extends: {kt_file}\ndata:\n  batch_size: yes\n")
    assert f"{child}: key 'data.batch_size': bad value True" in message(child)
    child = write(tmp_path / "null.yaml", f"extends: {kt_file}\noptim: null\n")
    assert f"{child}: key 'optim': bad value None" in message(child)
    # an error about a whole section: the layer that set a key of it last
    base = write(tmp_path / "base.yaml", f"extends: {kt_file}\nfeatures:\n  layers: [relu1_1, relu2_1, relu3_1, "
                 "relu4_1, relu5_1]\n")
    child = write(tmp_path / "feat.yaml", f"extends: {base}\nfeatures:\n  layer_weights: [1.0]\n")
    assert f"{child}: section 'features': layers has 5 entries but layer_weights has 1" in message(child)
    grandchild = write(tmp_path / "grand.yaml", f"extends: {child}\nname: g\n")
    assert f"{child}: section 'features'" in message(grandchild)
    assert f"{grandchild}: section 'features'" not in message(grandchild)


def test_every_batch_holding_every_type_is_checked_at_load(kt_file, tmp_path, monkeypatch):
    """KT and DA put one sample of each type in every batch: a batch smaller than the number of types,
    or a type no data.train source supplies, was refused by the loader only after the run folder and
    a FAILED MLflow run were made. Now the config names the key, value and what to set."""
    train = ", ".join(f"{{name: {d}, shards: cache/{d}, degradation: {d}}}" for d in ("haze", "rain", "blur", "snow"))
    four = ["data.degradations=[haze, rain, blur, snow]", f"data.train=[{train}]"]
    assert load_config(kt_file, [*four, "data.batch_size=4"]).data.batch_size == 4
    msg = message(kt_file, [*four, "data.batch_size=3"])
    assert "override 'data.batch_size=3'" in msg and "'data.batch_size'" in msg and "bad value 3" in msg
    assert "at least the number of types" in msg and "(4)" in msg
    msg = message(kt_file, ["data.degradations=[haze, rain, blur, snow]"])
    assert "'data.train'" in msg and "no source for ['snow']" in msg and "degradation: snow" in msg
    da = write(tmp_path / "da.yaml", "stage: da\ndata:\n  degradations: [haze, rain]\n  batch_size: 1\n"
               "  train: [{name: r, shards: s, degradation: rain}]\n")
    msg = message(da)
    assert "'data.batch_size'" in msg and "'data.train'" in msg and "no source for ['haze']" in msg
    # the CLI stops before any run folder or MLflow store exists
    from uniremoval.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "kt", "--config", str(kt_file), *four, "data.batch_size=3"]) == 2
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(("names", "said"), [
    (["haze", "haze"], r"'.*eval.data name\(s\) \['haze'\] are given twice"),
    (["real/haze"], (r".0.name': bad value 'real/haze': .*'real/haze': a source's name names files and MLflow "
                    r"metrics, and cannot hold /; use letters, digits, spaces and _ - . :, e.g. 'real_haze'")),
    ([".."], r".0.name': bad value '..': .* cannot be '.' or '..'"),
])
def test_eval_data_names_that_would_share_or_split_files_are_refused(tmp_path, names, said):
    """Each eval.data source writes out-<name>.json/.csv and <save_images>/<name>/ and a run eval-<name>:
    two sources of one name wrote the second's scores over the first's, silently; a '/' made folders."""
    data = ", ".join(f"{{name: '{n}', shards: s{i}}}" for i, n in enumerate(names))
    cfg = write(tmp_path / "e.yaml", f"stage: eval\neval:\n  data: [{data}]\n")
    with pytest.raises(ConfigError, match=r"key 'eval.data" + said):
        load_config(cfg)


def test_a_shard_source_that_lists_no_shards_is_named_before_anything_starts(tmp_path, monkeypatch):
    """A shard path that exists but lists no shards (a folder of images, an unmerged array build, an
    unfinished build), a pattern matching nothing or an empty path passed the check: a data.val one
    failed at the first validation, val_every steps in, without naming its key."""
    from uniremoval.cli import main
    from uniremoval.stages.preflight import check_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards" / "rain").mkdir(parents=True)
    (tmp_path / "shards" / "rain" / "rain-000000.tar").touch()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").touch()
    (tmp_path / "array").mkdir()
    (tmp_path / "array" / "manifest-job0.json").write_text("{}")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / ".build-state-0.json").write_text("{}")
    teacher = write(tmp_path / "t.yaml", "stage: teacher\ndegradation: rain\ndata:\n  degradations: [rain]\n"
                    "  train: [{name: r, shards: shards/rain}]\n  val: [{name: v, shards: shards/rain}]\n"
                    "tracking: {uri: null}\n")
    check_inputs(load_config(teacher))  # a folder of tars passes
    merge = "array holds per-job manifests but no manifest.json: when every job has finished, run `uniremoval shards merge array`"
    braces = "shards/rain/rain-{000000..000001}.tar"
    # a folder of images is named as such, with the command that packs it
    photos = ("photos holds neither manifest.json nor *.tar shards; it holds images (a.png...): pack them into shards "
              "first, e.g. `uniremoval shards build --format folder --root photos --degradation TYPE --out "
              "shards/NAME`, and give that folder")
    for spec, said in (("photos", photos),
                       ("array", merge),
                       ("cut", "cut holds an unfinished build"),
                       ("shards/none-*.tar", "shard pattern shards/none-*.tar: no file matches"),
                       (braces, f"shard pattern {braces}: 1 files missing, e.g. shards/rain/rain-000001.tar"),
                       (f"file://{tmp_path}/photos", photos),
                       # passed as a URL, then "did not exist" when the stream opened it (as s3:/b/x.tar)
                       ("s3://b/x.tar", ("shard s3://b/x.tar: s3:// URLs are not opened directly (http(s)://, "
                                         "file: and local paths are); stream it through a command that writes the "
                                         "tar to stdout, e.g. 'pipe:aws s3 cp s3://b/x.tar -'"))):
        with pytest.raises(ConfigError) as err:
            check_inputs(load_config(teacher, [f"data.val.0.shards={spec}"]))
        assert f"data.val.0 (v): {said}" in str(err.value).replace(str(tmp_path) + "/", ""), str(err.value)
    check_inputs(load_config(teacher, ["data.val.0.shards=shards/rain/*.tar"]))  # a pattern that matches
    with pytest.raises(ConfigError, match=r"key 'data.val.0.shards': bad value '': .*an empty shard path"):
        load_config(teacher, ["data.val.0.shards=''"])
    # the CLI refuses it before any run folder or MLflow store is made (status 2)
    assert main(["train", "teacher", "--config", str(teacher), "data.val.0.shards=photos"]) == 2
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_shard_folder_of_another_degradation_is_named_before_anything_starts(tmp_path, monkeypatch):
    """A source pointed at another type's shards (rain shards as 'snow'): the cache ran the snow teacher
    over rain images and labelled its manifest snow, validation scored rain as snow, and training
    skipped thousands of samples before giving up; each silently or late. Refused from the manifest."""
    import json

    from uniremoval.stages.preflight import check_inputs

    monkeypatch.chdir(tmp_path)
    for name, deg in (("rain_train", "rain"), ("snow_train", "snow"), ("rain_test", "rain")):
        (tmp_path / "shards" / name).mkdir(parents=True)
        (tmp_path / "shards" / name / "manifest.json").write_text(json.dumps(
            {"dataset": name, "shards": ["s-000000.tar"], "counts": {"total": 3, "degradation": {deg: 3}}}))
    teacher = write(tmp_path / "t.yaml", "stage: teacher\ndegradation: snow\ndata:\n  degradations: [snow]\n"
                    "  train: [{name: snow_train, shards: shards/snow_train}]\n"
                    "  val: [{name: snow_test, shards: shards/rain_test, degradation: snow}]\n")
    with pytest.raises(ConfigError) as err:
        check_inputs(load_config(teacher))
    msg = str(err.value)
    assert "data.val.0 (snow_test): shards/rain_test holds 3 rain sample(s)" in msg and "no 'snow' one" in msg
    assert "data.train" not in msg  # the train source (no degradation: the teacher's own) matches
    with pytest.raises(ConfigError, match=r"data\.train\.0 \(snow_train\): shards/rain_train holds 3 rain"):
        check_inputs(load_config(teacher, ["data.train.0.shards=shards/rain_train"]))
    check_inputs(load_config(teacher, ["data.val.0.shards=shards/snow_train"]))
    cache = write(tmp_path / "c.yaml", "stage: cache\ndata:\n  degradations: [snow]\n"
                  "  train: [{name: snow_train, shards: shards/rain_train, degradation: snow}]\n"
                  "teachers: {checkpoints: {snow: t.safetensors}}\n")
    with pytest.raises(ConfigError, match=r"data\.train\.0 \(snow_train\): shards/rain_train holds 3 rain"):
        check_inputs(load_config(cache))


def test_clear_shards_given_as_a_degraded_da_source_point_to_data_clear(tmp_path, monkeypatch):
    """Clear photos in DA's data.train: the refusal said `degradation: clear if these are the ones meant`,
    no type DA trains (refused next as not in data.degradations); it now says where clear photos go."""
    import json

    from uniremoval.stages.preflight import check_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards" / "photos").mkdir(parents=True)
    (tmp_path / "shards" / "photos" / "manifest.json").write_text(json.dumps(
        {"dataset": "photos", "shards": ["s-000000.tar"], "counts": {"total": 2, "degradation": {"clear": 2}}}))
    da = write(tmp_path / "da.yaml", "stage: da\ndata:\n  degradations: [haze]\n  batch_size: 1\n"
               "  train: [{name: h, shards: shards/photos, degradation: haze}]\n")
    with pytest.raises(ConfigError) as err:
        check_inputs(load_config(da))
    msg = str(err.value)
    assert "data.train.0 (h): shards/photos holds 2 clear sample(s)" in msg and "data.clear" in msg
    assert "degradation: clear" not in msg
    # A folder of clear photos and another type's images: the type is suggested, never 'clear'
    (tmp_path / "shards" / "photos" / "manifest.json").write_text(json.dumps(
        {"dataset": "photos", "shards": ["s-000000.tar"], "counts": {"total": 5, "degradation": {"clear": 2, "rain": 3}}}))
    with pytest.raises(ConfigError) as err:
        check_inputs(load_config(da))
    msg = str(err.value)
    assert "holds 2 clear, 3 rain sample(s)" in msg and "or degradation: rain if these" in msg, msg
    assert "degradation: clear" not in msg, msg


def test_a_teacher_source_of_no_known_type_is_refused(tmp_path):
    """A teacher leaves out other types' sources (one list may serve every teacher): a misspelt
    type dropped that source, or the only validation set (no best.safetensors), without a word."""
    teacher = write(tmp_path / "t.yaml", "stage: teacher\ndegradation: snow\ndata:\n  degradations: [haze, snow]\n"
                    "  train: [{name: s, shards: shards/s, degradation: snow}, {name: h, shards: shards/h, "
                    "degradation: haze}]\n  val: [{name: v, shards: shards/v, degradation: snow}]\n")
    assert [s.name for s in load_config(teacher).data.train] == ["s", "h"]  # another known type: left out
    msg = message(teacher, ["data.val.0.degradation=snwo"])
    assert "'data.val.0.degradation'" in msg and "'snwo'" in msg and "['snow', 'haze']" in msg
    msg = message(teacher, ["data.train.1.degradation=hzae"])
    assert "'data.train.1.degradation'" in msg and "'hzae'" in msg


def test_a_missing_teacher_of_a_new_type_names_no_config_that_does_not_exist(tmp_path, monkeypatch):
    """configs/teacher/ has haze, rain and blur: a 'snow' teacher's hint named configs/teacher/snow.yaml.
    The hint's config is looked up where its command reads it, in the working directory (a pip install
    has no configs/ beside the package; a user's own configs/teacher/snow.yaml counts)."""
    import shutil

    from uniremoval.stages.preflight import check_inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "teacher").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "teacher" / "haze.yaml", tmp_path / "configs" / "teacher" / "haze.yaml")
    train = ", ".join(f"{{name: {d}, shards: https://h/{d}.tar, degradation: {d}}}" for d in ("haze", "snow"))
    cfg = load_config(REPO / "configs" / "kt.yaml", [
        "data.degradations=[haze, snow]", f"data.train=[{train}]", "data.val=[]",
        "teachers.checkpoints={haze: t/haze.safetensors, snow: t/snow.safetensors}"])
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg)
    msg = str(err.value)
    assert "configs/teacher/snow.yaml" not in msg and "`degradation: snow`" in msg
    assert "teachers.checkpoints.haze: t/haze.safetensors does not exist; `uniremoval train teacher --config " \
        "configs/teacher/haze.yaml` writes it" in msg
    (tmp_path / "configs" / "teacher" / "snow.yaml").write_text("stage: teacher\ndegradation: snow\n")
    with pytest.raises(ConfigError, match="`uniremoval train teacher --config configs/teacher/snow.yaml` writes it"):
        check_inputs(cfg)


def test_a_da_loss_without_any_weighted_term_is_refused():
    """No term of L_da on, or each one's weight 0: the first backward tracebacked after the run started,
    or the run trained nothing, silently. Refused at load; one weighted term is enough."""
    da = Path(__file__).resolve().parents[1] / "configs" / "da.yaml"
    off = ["loss.use_gan=false", "loss.use_idt=false", "loss.use_eicl=false", "loss.use_efcl=false"]
    for overrides in (off, ["loss.use_gan=false", "loss.l2=0", "loss.l3=0"],
                      ["loss.use_gan=false", "loss.use_idt=false", "loss.use_eicl=false", "loss.l1=0"]):
        with pytest.raises(ConfigError, match=r"key 'loss': .*leaves no term of L_da with a weight"):
            load_config(da, overrides)
    for one_on in ("loss.use_gan=true", "loss.use_idt=true", "loss.use_eicl=true", "loss.use_efcl=true"):
        assert load_config(da, [*off, one_on]).stage == "da"
    assert load_config(da, ["loss.l2=0", "loss.l3=0"]).loss.use_gan  # the GAN term has no weight of its own


def test_degradation_types_and_source_names_that_would_break_keys_files_or_mlflow_are_refused(tmp_path, capsys):
    """A type is a config key (teachers.checkpoints.<type>), an MLflow param/tag/metric part and a file name:
    'rain+fog' lost its teacher's MLflow param, 'snow.v2' could not be set from the command line. A
    data.train/data.clear name is a folder of the cache ('../x' wrote outside cache.out) and part of MLflow
    artifact paths. Each is refused at load, naming the key and its source, with a name that works."""
    from uniremoval.cli import main

    kt = Path(__file__).parents[1] / "configs" / "kt.yaml"
    for override, key, fix in (("data.degradations=[haze,rain+fog]", "data.degradations", "'rain_fog'"),
                               ("data.degradations=[haze,snow.v2]", "data.degradations", "'snow_v2'"),
                               ("data.degradations=[haze,'2x']", "data.degradations", "'t2x'"),
                               ("data.train.0.degradation=a/b", "data.train.0.degradation", "'a_b'"),
                               ("data.val.0.degradation=low light", "data.val.0.degradation", "'low_light'")):
        with pytest.raises(ConfigError) as err:
            load_config(kt, [override])
        text = str(err.value)
        assert f"override {override!r}: key '{key}'" in text and "letters, digits, '_' and '-'" in text, text
        assert f"e.g. {fix}" in text, text
    for override, key, fix in (("data.train.0.name=../escape", "data.train.0.name", "cannot hold /"),
                               ("data.clear=[{name: 'a#b', shards: x}]", "data.clear.0.name", "cannot hold #")):
        with pytest.raises(ConfigError) as err:
            load_config(kt, [override])
        assert f"override {override!r}: key '{key}'" in str(err.value) and fix in str(err.value), str(err.value)
    teacher = write(tmp_path / "t.yaml", "stage: teacher\ndegradation: rain fog\ntracking: {uri: null}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: key 'degradation'.*e\.g\. 'rain_fog'"):
        load_config(teacher)
    ok = write(tmp_path / "ok.yaml", "stage: teacher\ndegradation: Low-light_2\ndata:\n  degradations: [Low-light_2]\n"
               "  train: [{name: 'low light v2', shards: x, degradation: Low-light_2}]\ntracking: {uri: null}\n")
    assert load_config(ok).degradation == "Low-light_2"  # letters, digits, '_' and '-' pass

    for argv in (["shards", "build", "--format", "folder", "--root", str(tmp_path), "--degradation", "rain+fog",
                  "--out", str(tmp_path / "s")],
                 ["eval", "--checkpoint", "none", "--data", str(tmp_path), "--degradation", "a.b"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "argument --degradation:" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_kt_config_that_leaves_l_fg_no_negative_is_refused(tmp_path):
    """L_fg contrasts the student's feature against the batch's other samples (of other types only, with
    feature_negatives=other_types): with one type, or a batch of one, it was 0 at every step, silently."""
    kt = write(tmp_path / "kt.yaml", "stage: kt\ndata:\n  degradations: [haze]\n  batch_size: 4\n"
               "  train: [{name: h, shards: cache/h, degradation: haze}]\n"
               "teachers: {checkpoints: {haze: t.safetensors}}\ntracking: {uri: null}\n")
    assert load_config(kt).loss.feature_negatives == "all"
    with pytest.raises(ConfigError, match=r"override 'loss.feature_negatives=other_types': key "
                       r"'loss.feature_negatives': bad value 'other_types': with one type in data.degradations "
                       r"\['haze'\] leaves L_fg \(use_fcl\) no negative"):
        load_config(kt, ["loss.feature_negatives=other_types"])
    with pytest.raises(ConfigError, match=r"key 'data.batch_size': bad value 1: leaves L_fg \(use_fcl\) no negative"):
        load_config(kt, ["data.batch_size=1"])
    for off in ("loss.use_fcl=false", "loss.a1=0", "loss.a2=0"):  # no L_fg: nothing to refuse
        load_config(kt, ["data.batch_size=1", "loss.feature_negatives=other_types", off])


def test_architectures_are_read_from_the_registry_with_their_presets_and_crop_multiple(kt_file, tmp_path, monkeypatch):
    """model.arch, its presets and the crop multiple come from models.ARCH_SPECS: a new architecture is one
    entry there (README: Extending). They were MPRNet's everywhere: one preset list for every architecture
    (a new one's config resolved to preset 'deblur' and failed at build, naming no key), and crops a
    multiple of 8 whatever the network."""
    from uniremoval import models
    from uniremoval.models import ArchSpec, build_model

    cfg = load_config(kt_file)
    assert (cfg.model.arch, cfg.model.preset, cfg.teachers.preset) == ("mprnet", "deblur", None)
    assert ("override 'teachers.preset=big': key 'teachers.preset': bad value 'big': is not a preset of "
            "model.arch=mprnet: choose one of deblur, derain, denoise, tiny") in message(kt_file, ["teachers.preset=big"])
    # an entry with presets must name one as its default (a config naming none resolved to None, refused
    # only at build naming no key)
    with pytest.raises(ValueError, match=r"default_preset None must be one of its presets \('small',\)"):
        ArchSpec("_toy_arch", "ToyNet", ("small",))
    assert "'unet' is not a registered architecture that restores images: choose one of mprnet" in message(
        kt_file, ["model.arch=unet"])
    assert "is not a registered architecture" in message(kt_file, ["model.arch=patch_discriminator"])
    monkeypatch.setitem(models.ARCH_SPECS, "plain", ArchSpec("torch.nn", "Identity"))
    teacher = write(tmp_path / "t.yaml", "stage: teacher\ndegradation: haze\nmodel: {arch: plain}\ndata: {crop_size: 20}\n")
    cfg = load_config(teacher)
    assert (cfg.model.arch, cfg.model.preset, cfg.data.crop_size) == ("plain", None, 20)
    assert "'tiny' is not a preset of model.arch=plain: it has none, leave it out" in message(
        teacher, ["model.preset=tiny"])
    assert type(build_model(cfg.model.arch, cfg.model.preset)).__name__ == "Identity"
    assert ("key 'data.crop_size': bad value 20: must be a multiple of 8 for model.arch=mprnet (e.g. 16)"
            in message(teacher, ["model.arch=mprnet"]))
